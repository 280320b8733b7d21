/*
 * The broker socket's token hot path in C: an optional accelerator for reactor.py.
 *
 * What it does: one `poll` is one `epoll_wait(0)` on the reactor's private epoll. For
 * every ready connection that is quiet (nothing half-received, nothing unsent, nothing
 * held back), it reads once; when the read is exactly one whole `token` or
 * `session_token` request that the pure-Python hot path (dispatch.py) would answer
 * from memory, it answers it here: the same checks on the same Python objects, the same
 * bytes. A profile's `token` is answered from its prepared answer without calling into
 * Python; a customer's `session_token` calls the session manager's own hot path
 * (`token_frame`), which notes the session's use, as dispatch.py does. Everything else
 * (the listener, a writable socket, a partial or pipelined read, any other op, an answer
 * not prepared, an ACL verdict not cached yet, a frame this parser does not take) goes
 * back to the reactor, with whatever was read, and is served there exactly as if this
 * module did not exist. So the accelerator decides nothing the Python code has not
 * already decided: it only skips the interpreter on the path Python has proved.
 *
 * Why C and not mypyc: the pure path spends ~2.8 us per answer, of which ~1.1 us are
 * the two system calls; the rest is the interpreter around them (method calls, bytes
 * objects, msgpack's generic decoder, the dispatcher's dict reads). mypyc compiled the
 * same Python to ~2.3 us. Here the request is parsed in place, the answer is built in
 * one buffer, and no Python object is made on the way but the few the checks read.
 *
 * Trust: a request frame comes from any local peer the reactor admitted. The parser
 * below takes one shape only (a fixmap of at most 15 entries, fixstr or str8 keys
 * "id", "op", "profile" or "app" and "handle", "min_valid", each at most once, with the
 * value types the hot path accepts) with every length checked against the frame's end,
 * and anything else goes back to Python untouched, whose decoder answers it (or refuses
 * it) as before.
 *
 * The Python objects read here, by attribute name (tests run the daemon with and
 * without this module and compare the answers byte for byte):
 *   Connection: closed, closing, held, out, decoder, acl_cache, last_active, partial_since
 *   FrameDecoder: _buffer, error
 *   Profile: config, frame
 *   TokenFrame: _revision, _session (its .revision), _serve_until, _prepared, served
 *   PreparedResponse: _head, _tail, _size
 *   SessionOps: customers (None, or the CustomerSessions with .apps and .token_frame), apps
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

/* The same bounds as geins_broker_client.protocol: RECV_SIZE and MAX_REQUEST_SIZE. */
#define RECV_SIZE 65536
#define MAX_REQUEST_SIZE (64 * 1024)
#define HEADER_SIZE 4
/* A token answer is a few hundred bytes (a JWT and a few fields); a larger prepared
 * answer is served by Python. */
#define MAX_ANSWER 16384
/* Doubles hold integers exactly up to 2^53: a larger min_valid is left to Python. */
#define EXACT_DOUBLE_INT 9007199254740992.0

static PyObject *s_closed, *s_closing, *s_held, *s_out, *s_decoder, *s_buffer, *s_error,
    *s_acl_cache, *s_last_active, *s_partial_since, *s_config, *s_frame, *s_revision_private,
    *s_session, *s_revision, *s_serve_until, *s_prepared, *s_head, *s_tail, *s_size,
    *s_served, *s_customers, *s_apps, *s_token_frame, *s_app_prefix;
static PyObject *one; /* 1, for served += 1 */

typedef struct {
    PyObject_HEAD
    int epfd;
    int max_events;
    struct epoll_event *events;
    unsigned char *in;  /* one recv, RECV_SIZE bytes */
    unsigned char *out; /* one answer, MAX_ANSWER bytes */
    PyObject *connections; /* the reactor's dict: fd -> Connection */
    PyObject *profiles;    /* the daemon's live table: name -> Profile */
    PyObject *default_profile;
    PyObject *session_ops; /* the ops of customer sessions (rpc/session_ops.py), or None */
    PyObject *inf; /* float('inf') */
    unsigned long long answered; /* requests answered here, for tests and the metrics */
} Fastpath;

/* -- the request ------------------------------------------------------------------- */

enum { OP_TOKEN = 1, OP_SESSION_TOKEN = 2 };

typedef struct {
    int op;
    int64_t id;
    int has_id;
    const unsigned char *profile; /* `token`: the profile's UTF-8, or NULL: the default */
    size_t profile_len;
    const unsigned char *app; /* `session_token`: the app's and the handle's UTF-8 */
    size_t app_len;
    const unsigned char *handle;
    size_t handle_len;
    double min_valid;
    int min_valid_is_float; /* as sent: Python's hot path is given the same type */
} Request;

/* A msgpack string's bytes at *p (fixstr, str8, str16 or str32), or 0 when the value at
 * *p is something else or runs past `end`. */
static int read_str(const unsigned char **p, const unsigned char *end,
                    const unsigned char **s, size_t *len)
{
    const unsigned char *q = *p;
    size_t n;
    if (q >= end)
        return 0;
    if ((*q & 0xe0) == 0xa0) {
        n = *q & 0x1f;
        q += 1;
    } else if (*q == 0xd9 && end - q >= 2) {
        n = q[1];
        q += 2;
    } else if (*q == 0xda && end - q >= 3) {
        n = ((size_t)q[1] << 8) | q[2];
        q += 3;
    } else if (*q == 0xdb && end - q >= 5) {
        n = ((size_t)q[1] << 24) | ((size_t)q[2] << 16) | ((size_t)q[3] << 8) | q[4];
        q += 5;
    } else {
        return 0;
    }
    if ((size_t)(end - q) < n)
        return 0;
    *s = q;
    *len = n;
    *p = q + n;
    return 1;
}

static uint64_t be(const unsigned char *q, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | q[i];
    return v;
}

/* A msgpack integer at *p that fits int64 (every encoding msgpack has for one), or 0. */
static int read_int(const unsigned char **p, const unsigned char *end, int64_t *out)
{
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    unsigned char t = *q;
    int n;
    int is_signed;
    if (t <= 0x7f) {
        *out = t;
        *p = q + 1;
        return 1;
    }
    if (t >= 0xe0) {
        *out = (int8_t)t;
        *p = q + 1;
        return 1;
    }
    switch (t) {
    case 0xcc: n = 1; is_signed = 0; break;
    case 0xcd: n = 2; is_signed = 0; break;
    case 0xce: n = 4; is_signed = 0; break;
    case 0xcf: n = 8; is_signed = 0; break;
    case 0xd0: n = 1; is_signed = 1; break;
    case 0xd1: n = 2; is_signed = 1; break;
    case 0xd2: n = 4; is_signed = 1; break;
    case 0xd3: n = 8; is_signed = 1; break;
    default: return 0;
    }
    if (end - q < 1 + n)
        return 0;
    uint64_t v = be(q + 1, n);
    if (is_signed) {
        /* sign-extend from n bytes */
        if (n < 8 && (v >> (8 * n - 1)) & 1)
            v |= ~(uint64_t)0 << (8 * n);
        *out = (int64_t)v;
    } else {
        if (v > (uint64_t)INT64_MAX)
            return 0;
        *out = (int64_t)v;
    }
    *p = q + 1 + n;
    return 1;
}

/* A msgpack number at *p as a double (an integer exactly representable, or a float32
 * or float64), or 0. */
static int read_number(const unsigned char **p, const unsigned char *end, double *out)
{
    const unsigned char *q = *p;
    if (q >= end)
        return 0;
    if (*q == 0xca && end - q >= 5) {
        uint32_t bits = (uint32_t)be(q + 1, 4);
        float f;
        memcpy(&f, &bits, 4);
        *out = f;
        *p = q + 5;
        return 1;
    }
    if (*q == 0xcb && end - q >= 9) {
        uint64_t bits = be(q + 1, 8);
        double d;
        memcpy(&d, &bits, 8);
        *out = d;
        *p = q + 9;
        return 1;
    }
    int64_t i;
    if (!read_int(p, end, &i))
        return 0;
    if ((double)i > EXACT_DOUBLE_INT || (double)i < -EXACT_DOUBLE_INT)
        return 0;
    *out = (double)i;
    return 1;
}

static int key_is(const unsigned char *k, size_t n, const char *name)
{
    return strlen(name) == n && memcmp(k, name, n) == 0;
}

/* Whether `body` is a `token` or `session_token` request of the one shape taken here. */
static int parse_request(const unsigned char *body, size_t size, Request *r)
{
    const unsigned char *p = body, *end = body + size;
    int seen_min_valid = 0;
    if (size == 0 || (*p & 0xf0) != 0x80)
        return 0;
    int entries = *p & 0x0f;
    p += 1;
    memset(r, 0, sizeof *r);
    for (int i = 0; i < entries; i++) {
        const unsigned char *k, *v;
        size_t klen, vlen;
        if (p >= end || !((*p & 0xe0) == 0xa0 || *p == 0xd9))
            return 0; /* keys are short strings in every client */
        if (!read_str(&p, end, &k, &klen))
            return 0;
        if (key_is(k, klen, "id")) {
            if (r->has_id || !read_int(&p, end, &r->id))
                return 0;
            r->has_id = 1;
        } else if (key_is(k, klen, "op")) {
            if (r->op || !read_str(&p, end, &v, &vlen))
                return 0;
            if (key_is(v, vlen, "token"))
                r->op = OP_TOKEN;
            else if (key_is(v, vlen, "session_token"))
                r->op = OP_SESSION_TOKEN;
            else
                return 0;
        } else if (key_is(k, klen, "profile")) {
            if (r->profile || !read_str(&p, end, &r->profile, &r->profile_len))
                return 0;
        } else if (key_is(k, klen, "app")) {
            if (r->app || !read_str(&p, end, &r->app, &r->app_len))
                return 0;
        } else if (key_is(k, klen, "handle")) {
            if (r->handle || !read_str(&p, end, &r->handle, &r->handle_len))
                return 0;
        } else if (key_is(k, klen, "min_valid")) {
            if (seen_min_valid)
                return 0;
            r->min_valid_is_float = p < end && (*p == 0xca || *p == 0xcb);
            if (!read_number(&p, end, &r->min_valid))
                return 0;
            /* (not >= also catches NaN) */
            if (!(r->min_valid >= 0))
                return 0;
            seen_min_valid = 1;
        } else {
            return 0;
        }
    }
    if (p != end || !r->has_id)
        return 0;
    if (r->op == OP_TOKEN)
        return r->app == NULL && r->handle == NULL;
    if (r->op == OP_SESSION_TOKEN)
        return r->profile == NULL && r->app != NULL && r->handle != NULL;
    return 0;
}

/* The msgpack encoding of `v`, as msgpack's Packer writes it (the smallest form). */
static size_t pack_int(unsigned char *o, int64_t v)
{
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 0x80) { o[0] = (unsigned char)u; return 1; }
        if (u <= 0xff) { o[0] = 0xcc; o[1] = (unsigned char)u; return 2; }
        if (u <= 0xffff) { o[0] = 0xcd; o[1] = u >> 8; o[2] = u & 0xff; return 3; }
        if (u <= 0xffffffffULL) {
            o[0] = 0xce;
            for (int i = 0; i < 4; i++) o[1 + i] = (u >> (24 - 8 * i)) & 0xff;
            return 5;
        }
        o[0] = 0xcf;
        for (int i = 0; i < 8; i++) o[1 + i] = (u >> (56 - 8 * i)) & 0xff;
        return 9;
    }
    if (v >= -32) { o[0] = (unsigned char)(int8_t)v; return 1; }
    uint64_t u = (uint64_t)v;
    if (v >= -128) { o[0] = 0xd0; o[1] = u & 0xff; return 2; }
    if (v >= -32768) { o[0] = 0xd1; o[1] = (u >> 8) & 0xff; o[2] = u & 0xff; return 3; }
    if (v >= INT32_MIN) {
        o[0] = 0xd2;
        for (int i = 0; i < 4; i++) o[1 + i] = (u >> (24 - 8 * i)) & 0xff;
        return 5;
    }
    o[0] = 0xd3;
    for (int i = 0; i < 8; i++) o[1 + i] = (u >> (56 - 8 * i)) & 0xff;
    return 9;
}

/* -- the Python state the hot path reads ------------------------------------------- */

/* 1 if `obj.name` is `expected` (identity), 0 if not, -1 with an exception set. */
static int attr_is(PyObject *obj, PyObject *name, PyObject *expected)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int same = v == expected;
    Py_DECREF(v);
    return same;
}

/* 1 if len(obj.name) == 0, 0 if not, -1 with an exception set. */
static int attr_empty(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyObject_Length(v);
    Py_DECREF(v);
    return n < 0 ? -1 : n == 0;
}

/* Whether the reactor would take one whole request read from `conn` on its usual path:
 * open, nothing buffered, held or unsent, not closing. 1, 0, or -1 with an exception. */
static int quiet(PyObject *conn)
{
    int r;
    if ((r = attr_is(conn, s_closed, Py_False)) != 1) return r;
    if ((r = attr_is(conn, s_closing, Py_False)) != 1) return r;
    if ((r = attr_is(conn, s_held, Py_None)) != 1) return r;
    if ((r = attr_empty(conn, s_out)) != 1) return r;
    PyObject *decoder = PyObject_GetAttr(conn, s_decoder);
    if (decoder == NULL)
        return -1;
    r = attr_empty(decoder, s_buffer);
    if (r == 1)
        r = attr_is(decoder, s_error, Py_None);
    Py_DECREF(decoder);
    return r;
}

/* The answer to a `token` request in self->out, as dispatch.py's hot path would give it:
 * its length, 0 when the hot path would not answer it from memory, -1 with an exception.
 * On an answer, counts it as served (TokenFrame.served). */
static Py_ssize_t answer_token(Fastpath *self, PyObject *conn, const Request *req, double now)
{
    PyObject *name = NULL, *profile, *acl = NULL, *cached, *config = NULL, *frame = NULL,
             *session = NULL, *rev = NULL, *rev_now = NULL, *until = NULL, *prepared = NULL,
             *head = NULL, *tail = NULL, *size = NULL, *served = NULL, *more = NULL;
    Py_ssize_t result = -1;

    if (req->profile == NULL) {
        name = Py_NewRef(self->default_profile);
    } else {
        name = PyUnicode_DecodeUTF8((const char *)req->profile, (Py_ssize_t)req->profile_len,
                                    "strict");
        if (name == NULL) {
            /* Python's decoder refuses the whole frame: let it say so. */
            PyErr_Clear();
            return 0;
        }
    }
    profile = PyDict_GetItemWithError(self->profiles, name); /* borrowed */
    if (profile == NULL)
        goto not_here;
    /* The ACL verdict this connection cached for this profile's configuration. */
    if ((acl = PyObject_GetAttr(conn, s_acl_cache)) == NULL || !PyDict_Check(acl))
        goto not_here;
    cached = PyDict_GetItemWithError(acl, name); /* borrowed */
    if (cached == NULL || !PyTuple_Check(cached) || PyTuple_GET_SIZE(cached) != 2)
        goto not_here;
    if ((config = PyObject_GetAttr(profile, s_config)) == NULL)
        goto not_here;
    if (PyTuple_GET_ITEM(cached, 0) != config || PyTuple_GET_ITEM(cached, 1) != Py_True)
        goto not_here;
    /* The profile's prepared answer, current for its session's revision. */
    if ((frame = PyObject_GetAttr(profile, s_frame)) == NULL
        || (session = PyObject_GetAttr(frame, s_session)) == NULL
        || (rev = PyObject_GetAttr(frame, s_revision_private)) == NULL
        || (rev_now = PyObject_GetAttr(session, s_revision)) == NULL)
        goto not_here;
    if (!PyLong_CheckExact(rev) || !PyLong_CheckExact(rev_now)
        || PyObject_RichCompareBool(rev, rev_now, Py_EQ) != 1)
        goto not_here;
    if ((until = PyObject_GetAttr(frame, s_serve_until)) == NULL || !PyFloat_CheckExact(until))
        goto not_here;
    double left = PyFloat_AS_DOUBLE(until) - now;
    if (left <= 0 || left < req->min_valid)
        goto not_here;
    if ((prepared = PyObject_GetAttr(frame, s_prepared)) == NULL || prepared == Py_None)
        goto not_here;
    if ((head = PyObject_GetAttr(prepared, s_head)) == NULL || !PyBytes_CheckExact(head)
        || (tail = PyObject_GetAttr(prepared, s_tail)) == NULL || !PyBytes_CheckExact(tail)
        || (size = PyObject_GetAttr(prepared, s_size)) == NULL || !PyLong_CheckExact(size))
        goto not_here;

    unsigned char packed_id[9];
    size_t id_len = pack_int(packed_id, req->id);
    Py_ssize_t head_len = PyBytes_GET_SIZE(head), tail_len = PyBytes_GET_SIZE(tail);
    Py_ssize_t body = head_len + (Py_ssize_t)id_len + tail_len;
    if (PyLong_AsSsize_t(size) != head_len + tail_len || HEADER_SIZE + body > MAX_ANSWER)
        goto not_here;
    unsigned char *o = self->out;
    o[0] = (body >> 24) & 0xff;
    o[1] = (body >> 16) & 0xff;
    o[2] = (body >> 8) & 0xff;
    o[3] = body & 0xff;
    memcpy(o + HEADER_SIZE, PyBytes_AS_STRING(head), (size_t)head_len);
    memcpy(o + HEADER_SIZE + head_len, packed_id, id_len);
    memcpy(o + HEADER_SIZE + head_len + id_len, PyBytes_AS_STRING(tail), (size_t)tail_len);

    /* served += 1 */
    if ((served = PyObject_GetAttr(frame, s_served)) == NULL)
        goto done;
    if ((more = PyNumber_Add(served, one)) == NULL
        || PyObject_SetAttr(frame, s_served, more) < 0)
        goto done;
    result = HEADER_SIZE + body;
    goto done;

not_here:
    if (PyErr_Occurred())
        goto done; /* -1: the caller clears it and hands the read back */
    result = 0;
done:
    Py_XDECREF(name);
    Py_XDECREF(acl);
    Py_XDECREF(config);
    Py_XDECREF(frame);
    Py_XDECREF(session);
    Py_XDECREF(rev);
    Py_XDECREF(rev_now);
    Py_XDECREF(until);
    Py_XDECREF(prepared);
    Py_XDECREF(head);
    Py_XDECREF(tail);
    Py_XDECREF(size);
    Py_XDECREF(served);
    Py_XDECREF(more);
    return result;
}

/* -- the poll ------------------------------------------------------------------------ */

/* The daemon's wall clock, read by Python once per poll and moved on here by the real
 * time elapsed since: a bearer is never served past its expiry because a batch took a
 * few milliseconds (under a test's virtual clock, microseconds of real time are added
 * to it, which no expiry test can tell apart). */
typedef struct {
    double wall;
    struct timespec since;
} WallClock;

static double wall_now(const WallClock *clock)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return clock->wall + (double)(t.tv_sec - clock->since.tv_sec)
        + (double)(t.tv_nsec - clock->since.tv_nsec) / 1e9;
}

/* Appends (fd, mask, data, unsent) to `left`; data and unsent may be NULL for None. */
static int hand_back(PyObject *left, int fd, uint32_t mask, PyObject *data, PyObject *unsent)
{
    PyObject *item = Py_BuildValue("(iIOO)", fd, (unsigned int)mask, data ? data : Py_None,
                                   unsent ? unsent : Py_None);
    if (item == NULL)
        return -1;
    int r = PyList_Append(left, item);
    Py_DECREF(item);
    return r;
}

/* The answer to a `session_token` request, as dispatch.py's hot path would give it:
 * a new reference to its bytes, Py_None (a new reference) when that path would not
 * answer it from memory, NULL with an exception. The session itself is the session
 * manager's to look up (`customers.token_frame`, called here as dispatch.py calls it):
 * it notes the session's use and may move it in its LRU, which stays Python's. */
static PyObject *answer_session(Fastpath *self, PyObject *conn, const Request *req,
                                PyObject *wall)
{
    PyObject *name = NULL, *handle = NULL, *customers = NULL, *apps = NULL, *app,
             *customer_apps = NULL, *key = NULL, *acl = NULL, *cached, *token_frame = NULL,
             *id = NULL, *min_valid = NULL, *result = NULL;
    if (self->session_ops == Py_None)
        return Py_NewRef(Py_None);
    name = PyUnicode_DecodeUTF8((const char *)req->app, (Py_ssize_t)req->app_len, "strict");
    handle = name == NULL ? NULL
        : PyUnicode_DecodeUTF8((const char *)req->handle, (Py_ssize_t)req->handle_len, "strict");
    if (handle == NULL) {
        PyErr_Clear(); /* Python's decoder refuses the whole frame: let it say so */
        goto not_here;
    }
    if ((customers = PyObject_GetAttr(self->session_ops, s_customers)) == NULL
        || customers == Py_None
        || (apps = PyObject_GetAttr(self->session_ops, s_apps)) == NULL || !PyDict_Check(apps))
        goto not_here;
    if ((app = PyDict_GetItemWithError(apps, name)) == NULL) /* borrowed */
        goto not_here;
    if ((customer_apps = PyObject_GetAttr(customers, s_apps)) == NULL
        || PySequence_Contains(customer_apps, name) != 1)
        goto not_here;
    /* The ACL verdict this connection cached for this app's configuration. */
    if ((key = PyUnicode_Concat(s_app_prefix, name)) == NULL
        || (acl = PyObject_GetAttr(conn, s_acl_cache)) == NULL || !PyDict_Check(acl))
        goto not_here;
    cached = PyDict_GetItemWithError(acl, key); /* borrowed */
    if (cached == NULL || !PyTuple_Check(cached) || PyTuple_GET_SIZE(cached) != 2
        || PyTuple_GET_ITEM(cached, 0) != app || PyTuple_GET_ITEM(cached, 1) != Py_True)
        goto not_here;
    if ((token_frame = PyObject_GetAttr(customers, s_token_frame)) == NULL
        || (id = PyLong_FromLongLong(req->id)) == NULL)
        goto not_here;
    min_valid = req->min_valid_is_float ? PyFloat_FromDouble(req->min_valid)
                                        : PyLong_FromDouble(req->min_valid);
    if (min_valid == NULL)
        goto not_here;
    result = PyObject_CallFunctionObjArgs(token_frame, id, name, handle, min_valid, wall, NULL);
    if (result != NULL && result != Py_None && !PyBytes_CheckExact(result))
        Py_CLEAR(result);
    goto done;
not_here:
    if (!PyErr_Occurred())
        result = Py_NewRef(Py_None);
done:
    Py_XDECREF(name);
    Py_XDECREF(handle);
    Py_XDECREF(customers);
    Py_XDECREF(apps);
    Py_XDECREF(customer_apps);
    Py_XDECREF(key);
    Py_XDECREF(acl);
    Py_XDECREF(token_frame);
    Py_XDECREF(id);
    Py_XDECREF(min_valid);
    return result;
}

/* Serves one ready connection: 0, or -1 when Python is out of memory (the reactor's
 * poll then fails as `select.epoll.poll` would). A fault in the Python state read
 * hands the read back instead, for the reactor's own path to meet and log. */
static int serve_one(Fastpath *self, PyObject *left, int fd, uint32_t mask,
                     const WallClock *clock, PyObject *loop_now)
{
    PyObject *key = PyLong_FromLong(fd);
    if (key == NULL)
        return -1;
    PyObject *conn = PyDict_GetItemWithError(self->connections, key); /* borrowed */
    Py_DECREF(key);
    if (conn == NULL) {
        if (PyErr_Occurred())
            return -1;
        return hand_back(left, fd, mask, NULL, NULL); /* the listener */
    }
    if (mask != EPOLLIN)
        return hand_back(left, fd, mask, NULL, NULL);
    Py_INCREF(conn);
    int r = quiet(conn);
    if (r != 1) {
        PyErr_Clear();
        Py_DECREF(conn);
        return hand_back(left, fd, mask, NULL, NULL);
    }

    ssize_t n;
    do {
        n = recv(fd, self->in, RECV_SIZE, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        Py_DECREF(conn);
        return 0; /* as the reactor's own read: nothing to do yet */
    }
    PyObject *data = NULL;
    if (n <= 0) {
        /* Gone (or broken): the reactor closes it on an empty read. */
        data = PyBytes_FromStringAndSize(NULL, 0);
        goto give_back;
    }

    /* The answer: built in self->out (`token`) or made by Python (`session_token`). */
    Request req;
    const unsigned char *out = self->out;
    PyObject *made = NULL;
    Py_ssize_t len = 0;
    uint32_t size = n > HEADER_SIZE ? (uint32_t)be(self->in, HEADER_SIZE) : 0;
    if (n > HEADER_SIZE && (size_t)size + HEADER_SIZE == (size_t)n && size <= MAX_REQUEST_SIZE
        && parse_request(self->in + HEADER_SIZE, size, &req)) {
        double now = wall_now(clock);
        PyObject *now_object;
        if (req.op == OP_TOKEN) {
            len = answer_token(self, conn, &req, now);
        } else if ((now_object = PyFloat_FromDouble(now)) == NULL) {
            len = -1;
        } else if ((made = answer_session(self, conn, &req, now_object)) == NULL) {
            Py_DECREF(now_object);
            len = -1;
        } else if (made == Py_None) {
            Py_DECREF(now_object);
            Py_CLEAR(made);
        } else {
            Py_DECREF(now_object);
            out = (const unsigned char *)PyBytes_AS_STRING(made);
            len = PyBytes_GET_SIZE(made);
        }
        if (len < 0 && !PyErr_ExceptionMatches(PyExc_Exception)) {
            /* KeyboardInterrupt, SystemExit, ...: not the request's fault, and not
             * ours to swallow. */
            Py_DECREF(conn);
            return -1;
        }
        if (len < 0) {
            PyErr_Clear(); /* Python's way will meet the same fault, and log it */
            len = 0;
        }
    }
    if (len == 0) {
        data = PyBytes_FromStringAndSize((const char *)self->in, n);
        goto give_back;
    }

    /* Answered: the usual path's bookkeeping, then the send. */
    if (PyObject_SetAttr(conn, s_last_active, loop_now) < 0
        || PyObject_SetAttr(conn, s_partial_since, self->inf) < 0) {
        PyErr_Clear();
    }
    ssize_t sent;
    do {
        sent = send(fd, out, (size_t)len, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    Py_DECREF(conn);
    self->answered++;
    if (sent == len) {
        Py_XDECREF(made);
        return 0;
    }
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        Py_XDECREF(made);
        data = PyBytes_FromStringAndSize(NULL, 0); /* the reactor closes it */
        if (data == NULL)
            return -1;
        r = hand_back(left, fd, mask, data, NULL);
        Py_DECREF(data);
        return r;
    }
    if (sent < 0)
        sent = 0;
    /* The client is not reading: the reactor keeps the rest and waits for it. */
    PyObject *unsent = PyBytes_FromStringAndSize((const char *)out + sent, len - sent);
    Py_XDECREF(made);
    if (unsent == NULL)
        return -1;
    r = hand_back(left, fd, mask, NULL, unsent);
    Py_DECREF(unsent);
    return r;

give_back:
    Py_DECREF(conn);
    if (data == NULL)
        return -1;
    r = hand_back(left, fd, mask, data, NULL);
    Py_DECREF(data);
    return r;
}

PyDoc_STRVAR(poll_doc,
"poll(wall_now, loop_now) -> list | None\n\n"
"One epoll_wait(0) on the reactor's epoll, answering what the token hot path answers\n"
"from memory. None when nothing was ready; else the events left to the reactor, as\n"
"(fd, mask, data, unsent): data is what was read and not answered (b'' for a closed\n"
"peer), unsent the tail of an answer the socket did not take; both None when the\n"
"event was not touched. wall_now is the daemon's wall clock (the bearer's expiry is\n"
"checked against it, moved on by the real time the poll takes), loop_now trio's clock\n"
"(the connection's last activity).");

static PyObject *Fastpath_poll(Fastpath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "poll(wall_now, loop_now)");
        return NULL;
    }
    WallClock clock;
    clock.wall = PyFloat_AsDouble(args[0]);
    if (clock.wall == -1.0 && PyErr_Occurred())
        return NULL;
    clock_gettime(CLOCK_MONOTONIC, &clock.since);
    PyObject *loop_now = args[1];
    int ready;
    do {
        ready = epoll_wait(self->epfd, self->events, self->max_events, 0);
    } while (ready < 0 && errno == EINTR);
    if (ready < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (ready == 0)
        Py_RETURN_NONE;
    PyObject *left = PyList_New(0);
    if (left == NULL)
        return NULL;
    for (int i = 0; i < ready; i++) {
        int fd = self->events[i].data.fd;
        uint32_t mask = self->events[i].events;
        if (serve_one(self, left, fd, mask, &clock, loop_now) < 0) {
            /* No memory for a hand-back: the events not served yet stay ready in the
             * level-triggered epoll, and the reactor's next poll sees them again. */
            Py_DECREF(left);
            return NULL;
        }
    }
    return left;
}

/* -- the type ------------------------------------------------------------------------ */

static int Fastpath_init(Fastpath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoll_fd", "connections", "profiles", "default_profile",
                             "session_ops", "max_events", NULL};
    int epfd, max_events = 1024;
    PyObject *connections, *profiles, *default_profile, *session_ops;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO!O!UO|i", kwlist, &epfd, &PyDict_Type,
                                     &connections, &PyDict_Type, &profiles, &default_profile,
                                     &session_ops, &max_events))
        return -1;
    if (max_events < 1 || max_events > 65536) {
        PyErr_SetString(PyExc_ValueError, "max_events must be 1..65536");
        return -1;
    }
    PyMem_Free(self->events);
    PyMem_Free(self->in);
    PyMem_Free(self->out);
    self->events = PyMem_Calloc((size_t)max_events, sizeof(struct epoll_event));
    self->in = PyMem_Malloc(RECV_SIZE);
    self->out = PyMem_Malloc(MAX_ANSWER);
    if (self->events == NULL || self->in == NULL || self->out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epfd;
    self->max_events = max_events;
    Py_XSETREF(self->connections, Py_NewRef(connections));
    Py_XSETREF(self->profiles, Py_NewRef(profiles));
    Py_XSETREF(self->default_profile, Py_NewRef(default_profile));
    Py_XSETREF(self->session_ops, Py_NewRef(session_ops));
    Py_XSETREF(self->inf, PyFloat_FromDouble(INFINITY));
    return self->inf == NULL ? -1 : 0;
}

static int Fastpath_traverse(Fastpath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->connections);
    Py_VISIT(self->profiles);
    Py_VISIT(self->session_ops);
    return 0;
}

static int Fastpath_clear(Fastpath *self)
{
    Py_CLEAR(self->connections);
    Py_CLEAR(self->profiles);
    Py_CLEAR(self->default_profile);
    Py_CLEAR(self->session_ops);
    Py_CLEAR(self->inf);
    return 0;
}

static void Fastpath_dealloc(Fastpath *self)
{
    PyObject_GC_UnTrack(self);
    Fastpath_clear(self);
    PyMem_Free(self->events);
    PyMem_Free(self->in);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Fastpath_methods[] = {
    {"poll", (PyCFunction)(void (*)(void))Fastpath_poll, METH_FASTCALL, poll_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Fastpath_members[] = {
    {"answered", T_ULONGLONG, offsetof(Fastpath, answered), READONLY,
     "Requests answered by the C path (each also counted in its TokenFrame.served)."},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(Fastpath_doc,
"Fastpath(epoll_fd, connections, profiles, default_profile, session_ops, max_events=1024)\n\n"
"The token hot path over the reactor's epoll; see the module's source for the contract.");

static PyTypeObject FastpathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.rpc._fastpath.Fastpath",
    .tp_basicsize = sizeof(Fastpath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = Fastpath_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Fastpath_init,
    .tp_dealloc = (destructor)Fastpath_dealloc,
    .tp_traverse = (traverseproc)Fastpath_traverse,
    .tp_clear = (inquiry)Fastpath_clear,
    .tp_methods = Fastpath_methods,
    .tp_members = Fastpath_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "broker.rpc._fastpath",
    .m_doc = "The broker socket's token hot path in C (optional; reactor.py without it).",
    .m_size = -1,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__fastpath(void)
{
    INTERN(s_closed, "closed");
    INTERN(s_closing, "closing");
    INTERN(s_held, "held");
    INTERN(s_out, "out");
    INTERN(s_decoder, "decoder");
    INTERN(s_buffer, "_buffer");
    INTERN(s_error, "error");
    INTERN(s_acl_cache, "acl_cache");
    INTERN(s_last_active, "last_active");
    INTERN(s_partial_since, "partial_since");
    INTERN(s_config, "config");
    INTERN(s_frame, "frame");
    INTERN(s_revision_private, "_revision");
    INTERN(s_session, "_session");
    INTERN(s_revision, "revision");
    INTERN(s_serve_until, "_serve_until");
    INTERN(s_prepared, "_prepared");
    INTERN(s_head, "_head");
    INTERN(s_tail, "_tail");
    INTERN(s_size, "_size");
    INTERN(s_served, "served");
    INTERN(s_customers, "customers");
    INTERN(s_apps, "apps");
    INTERN(s_token_frame, "token_frame");
    INTERN(s_app_prefix, "app:");
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (PyType_Ready(&FastpathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Fastpath", (PyObject *)&FastpathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
