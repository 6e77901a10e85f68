"""The one compiled part: tiercache._q4, the int4 x int8 GEMV kernel (tiercache/_q4.c).

Optional: where no C compiler is found the install goes on without it, and tiercache computes
q4 weights with torch's int4 kernel (engine/q4.py says which one runs)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("tiercache._q4", ["tiercache/_q4.c"], optional=True,
                             extra_compile_args=["-O3", "-std=gnu11"],
                             extra_link_args=["-lpthread"])])
