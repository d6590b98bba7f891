"""Build the shimcore Cython extension; all metadata lives in pyproject.toml."""
from setuptools import Extension, setup
from Cython.Build import cythonize

extensions = [
    Extension(
        "shimcore._engine",
        ["src/shimcore/_engine.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
    ),
    Extension(
        "shimfs._notify",
        ["src/shimfs/_notify.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
    ),
    Extension(
        "shimfs._wire",
        ["src/shimfs/_wire.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
    ),
    Extension(
        "shimcore._creds",
        ["src/shimcore/_creds.pyx"],
        extra_compile_args=["-O2", "-D_GNU_SOURCE"],
    ),
]

# include_path: shimfs._notify and shimfs._wire cimport shimcore._engine (its .pxd).
setup(ext_modules=cythonize(extensions, include_path=["src"],
                            compiler_directives={"language_level": "3"}))
