"""Only for the optional C extension; everything else is in setup.cfg.

``wsgi_hijack._fanout`` is the fan-out's inner loop (one send() per
connection). ``optional=True``: where it cannot be built (no C compiler),
the package installs without it and the reactor uses its Python loop.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wsgi_hijack._fanout", ["wsgi_hijack/_fanout.c"],
                             optional=True)])
