/* The fan-out's inner loop in C: the same bytes to many sockets.
 *
 * The same loop in Python (the reactor's fallback) costs more per connection
 * than this one on a real round, although its own bytecode is a few dozen
 * instructions: the kernel's send path between two writes evicts the
 * interpreter's code and data from the caches, and every Python call then
 * misses (benchmarks/results/results.md; benchmarks/fanout_loop.py). Here the
 * loop is a few instructions that stay cached, it calls send() with
 * MSG_DONTWAIT | MSG_NOSIGNAL (no vfs write() path), and the GIL is released
 * for the whole loop, so sender threads (WSGI_HIJACK_SEND_THREADS) write in
 * parallel.
 *
 * Optional: without a C compiler the package installs without it and the
 * reactor uses the Python loop, with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

PyDoc_STRVAR(write_each_doc,
"write_each(fds, data) -> list of (fd, sent)\n\n"
"Write data once to each fd (a list of ints), without blocking. Return the\n"
"fds that did not take all of it: (fd, None) if the write failed (would\n"
"block, or an error), (fd, n) if it took only n bytes. The GIL is released\n"
"while writing.");

static PyObject *
write_each(PyObject *module, PyObject *args)
{
    PyObject *fds;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "O!y*:write_each", &PyList_Type, &fds, &data))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(fds);
    int *fdv = PyMem_Malloc((n ? n : 1) * sizeof(int));
    ssize_t *sent = PyMem_Malloc((n ? n : 1) * sizeof(ssize_t));
    PyObject *trouble = NULL;
    if (fdv == NULL || sent == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred())
            goto done;
        if (fd < 0 || fd > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "write_each: fd %ld out of range", fd);
            goto done;
        }
        fdv[i] = (int)fd;
    }
    const char *buf = data.buf;
    size_t len = (size_t)data.len;
    Py_ssize_t short_count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        ssize_t r = send(fdv[i], buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0 && errno == ENOTSOCK)  /* a pipe or a file: what os.write would do */
            r = write(fdv[i], buf, len);
        sent[i] = r;
        if (r != (ssize_t)len)
            short_count++;
    }
    Py_END_ALLOW_THREADS
    trouble = PyList_New(0);
    if (trouble == NULL || short_count == 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (sent[i] == (ssize_t)len)
            continue;
        PyObject *item = sent[i] < 0 ? Py_BuildValue("(iO)", fdv[i], Py_None)
                                     : Py_BuildValue("(in)", fdv[i], (Py_ssize_t)sent[i]);
        if (item == NULL || PyList_Append(trouble, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(trouble);
            goto done;
        }
        Py_DECREF(item);
    }
done:
    PyMem_Free(fdv);
    PyMem_Free(sent);
    PyBuffer_Release(&data);
    return trouble;
}

static PyMethodDef methods[] = {
    {"write_each", write_each, METH_VARARGS, write_each_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wsgi_hijack._fanout",
    "The fan-out's inner loop in C (see _fanout.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fanout(void)
{
    return PyModule_Create(&module);
}
