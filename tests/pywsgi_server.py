"""Run tests.apps:app under gevent.pywsgi.WSGIServer: ``python tests/pywsgi_server.py PORT``."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.apps import app  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    server = WSGIServer(("127.0.0.1", int(sys.argv[1])), app)
    print("serving", flush=True)
    server.serve_forever()
