"""gunicorn worker classes that accept through :mod:`wsgi_hijack.lobby`.

One module per gunicorn worker kind, as gunicorn's own ``workers/``:
:mod:`.ggevent` (``-k wsgi_hijack.workers.ggevent.GeventWorker``) and
:mod:`.gthread` (``-k wsgi_hijack.workers.gthread.ThreadWorker``);
:mod:`.checks` says which settings would lose clients. Importing this
package imports neither worker (each pulls in its server's modules).
"""
