/* Binance combined-stream frames -> Arrow column buffers, in one pass over a batch.
 *
 * k2d/venues/binance.py calls scan() on a batch's market frames. It takes only frames in
 * the venue's own form (compact JSON, every field present, no escapes, every value a valid
 * row); for anything else it returns None and the Python parser takes the batch, with its
 * dead letters, so both ways give the same rows. The rows come back grouped by symbol (each
 * symbol's rows together, symbols in the order each first comes, rows in batch order), as
 * k2d.columns.by_stream leaves them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ID INT64_MAX
#define MAX_TIME_MS 253402300799999LL /* k2d.venues.binance.MAX_TIME_US // 1000 */

typedef struct {
    const char *at;
    Py_ssize_t len;
} Text;

typedef struct {
    Text id, event;   /* t (or u), E */
    Text dec[4];      /* trades: p, q; quotes: b, B, a, A */
    int64_t id_value, time_ms, event_ms, received;
    int32_t sym;
    uint8_t kind, maker, best;
} Row;

enum { TRADE = 0, QUOTE = 1 };

typedef struct {
    const char *key;
    Py_ssize_t len;
    int32_t sym;
    uint8_t kind;
} Stream;

typedef struct {
    Stream *slots;
    size_t mask;
} StreamTable;

static uint64_t fnv1a(const char *s, Py_ssize_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static const Stream *stream_find(const StreamTable *t, const char *s, Py_ssize_t n)
{
    for (size_t i = fnv1a(s, n) & t->mask;; i = (i + 1) & t->mask) {
        const Stream *slot = &t->slots[i];
        if (slot->key == NULL)
            return NULL;
        if (slot->len == n && memcmp(slot->key, s, (size_t)n) == 0)
            return slot;
    }
}

/* A JSON string with no escapes and only printable ASCII; the cursor moves past it. */
static int take_text(const char **p, const char *end, Text *out)
{
    const char *s = *p;
    if (s >= end || *s != '"')
        return 0;
    const char *start = ++s;
    while (s < end && *s != '"') {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c >= 0x7f || c == '\\')
            return 0;
        s++;
    }
    if (s >= end)
        return 0;
    out->at = start;
    out->len = s - start;
    *p = s + 1;
    return 1;
}

/* A JSON integer from 0 to INT64_MAX, written as JSON writes it (no sign, no leading zero,
 * no fraction or exponent), so its text is the same as the number printed back. */
static int take_uint(const char **p, const char *end, Text *text, int64_t *value)
{
    const char *s = *p, *start = s;
    if (s >= end || *s < '0' || *s > '9')
        return 0;
    uint64_t v = 0;
    while (s < end && *s >= '0' && *s <= '9') {
        if (s - start >= 19)
            return 0;
        v = v * 10 + (uint64_t)(*s - '0');
        s++;
    }
    if ((s - start > 1 && *start == '0') || v > (uint64_t)INT64_MAX)
        return 0;
    if (s < end && (*s == '.' || *s == 'e' || *s == 'E'))
        return 0;
    if (text != NULL) {
        text->at = start;
        text->len = s - start;
    }
    *value = (int64_t)v;
    *p = s;
    return 1;
}

static int take_bool(const char **p, const char *end, uint8_t *value)
{
    const char *s = *p;
    if (end - s >= 4 && memcmp(s, "true", 4) == 0) {
        *value = 1;
        *p = s + 4;
        return 1;
    }
    if (end - s >= 5 && memcmp(s, "false", 5) == 0) {
        *value = 0;
        *p = s + 5;
        return 1;
    }
    return 0;
}

/* decimal(18,8) as k2d.venues.binance._DECIMAL_RE has it: 1-10 digits, then optionally a
 * point and 1-8 digits. Sets *positive when a digit is not zero. */
static int is_decimal(const Text *t, int *positive)
{
    const char *s = t->at, *end = t->at + t->len;
    Py_ssize_t whole = 0, frac = 0;
    *positive = 0;
    while (s < end && *s >= '0' && *s <= '9') {
        *positive |= *s != '0';
        whole++;
        s++;
    }
    if (whole < 1 || whole > 10)
        return 0;
    if (s == end)
        return 1;
    if (*s++ != '.')
        return 0;
    while (s < end && *s >= '0' && *s <= '9') {
        *positive |= *s != '0';
        frac++;
        s++;
    }
    return s == end && frac >= 1 && frac <= 8;
}

static int take_key(const char **p, const char *end, char *key)
{
    const char *s = *p;
    /* Every key of both payloads is one letter: "x": */
    if (end - s < 4 || s[0] != '"' || s[2] != '"' || s[3] != ':')
        return 0;
    *key = s[1];
    *p = s + 4;
    return 1;
}

/* One frame into `row`; 0 when it is not a valid trade or quote in the venue's form. */
static int scan_frame(const char *s, const char *end, const StreamTable *streams,
                      PyObject *symbols, int64_t received, int64_t max_skew_us, Row *row)
{
    static const char head[] = "{\"stream\":";
    static const char data[] = ",\"data\":{";
    if (end - s < (Py_ssize_t)sizeof head - 1 || memcmp(s, head, sizeof head - 1) != 0)
        return 0;
    s += sizeof head - 1;
    Text stream;
    if (!take_text(&s, end, &stream))
        return 0;
    const Stream *found = stream_find(streams, stream.at, stream.len);
    if (found == NULL)
        return 0;
    if (end - s < (Py_ssize_t)sizeof data - 1 || memcmp(s, data, sizeof data - 1) != 0)
        return 0;
    s += sizeof data - 1;
    row->kind = found->kind;
    row->sym = found->sym;
    row->received = received;
    unsigned seen = 0;
    Text symbol = {NULL, 0}, ignored;
    for (;;) {
        char key;
        if (!take_key(&s, end, &key))
            return 0;
        unsigned bit;
        int ok;
        if (row->kind == TRADE) {
            switch (key) {
            case 'e': bit = 1; ok = take_text(&s, end, &ignored); break;
            case 'E': bit = 2; ok = take_uint(&s, end, &row->event, &row->event_ms); break;
            case 's': bit = 4; ok = take_text(&s, end, &symbol); break;
            case 't': bit = 8; ok = take_uint(&s, end, &row->id, &row->id_value); break;
            case 'p': bit = 16; ok = take_text(&s, end, &row->dec[0]); break;
            case 'q': bit = 32; ok = take_text(&s, end, &row->dec[1]); break;
            case 'T': bit = 64; ok = take_uint(&s, end, NULL, &row->time_ms); break;
            case 'm': bit = 128; ok = take_bool(&s, end, &row->maker); break;
            case 'M': bit = 256; ok = take_bool(&s, end, &row->best); break;
            default: return 0;
            }
        } else {
            switch (key) {
            case 'u': bit = 1; ok = take_uint(&s, end, &row->id, &row->id_value); break;
            case 's': bit = 2; ok = take_text(&s, end, &symbol); break;
            case 'b': bit = 4; ok = take_text(&s, end, &row->dec[0]); break;
            case 'B': bit = 8; ok = take_text(&s, end, &row->dec[1]); break;
            case 'a': bit = 16; ok = take_text(&s, end, &row->dec[2]); break;
            case 'A': bit = 32; ok = take_text(&s, end, &row->dec[3]); break;
            default: return 0;
            }
        }
        if (!ok || (seen & bit))
            return 0;
        seen |= bit;
        if (s < end && *s == ',') {
            s++;
            continue;
        }
        if (end - s == 2 && s[0] == '}' && s[1] == '}')
            break;
        return 0;
    }
    /* The symbol field must name the stream's symbol. */
    PyObject *expected = PyList_GET_ITEM(symbols, row->sym);
    if (symbol.len != PyBytes_GET_SIZE(expected)
        || memcmp(symbol.at, PyBytes_AS_STRING(expected), (size_t)symbol.len) != 0)
        return 0;
    int positive;
    if (row->kind == TRADE) {
        if (seen != 511)
            return 0;
        if (row->time_ms > MAX_TIME_MS || row->event_ms > MAX_TIME_MS)
            return 0;
        int64_t skew = row->time_ms * 1000 - received;
        if (skew < -max_skew_us || skew > max_skew_us)
            return 0;
        for (int i = 0; i < 2; i++)
            if (!is_decimal(&row->dec[i], &positive) || !positive)
                return 0;
    } else {
        if (seen != 63)
            return 0;
        /* Both sides quoted: a zero price (an empty side) goes the Python way, which nulls it. */
        for (int i = 0; i < 4; i++)
            if (!is_decimal(&row->dec[i], &positive) || (!positive && i % 2 == 0))
                return 0;
    }
    return 1;
}

/* A string column: int32 offsets and the bytes, filled by the caller. */
typedef struct {
    PyObject *offsets, *data;
    int32_t *off;
    char *at;
} StringColumn;

static int string_column(StringColumn *c, Py_ssize_t rows, Py_ssize_t bytes)
{
    if (bytes > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a batch's text column over 2 GiB");
        return 0;
    }
    c->offsets = PyBytes_FromStringAndSize(NULL, (rows + 1) * 4);
    c->data = PyBytes_FromStringAndSize(NULL, bytes);
    if (c->offsets == NULL || c->data == NULL)
        return 0;
    c->off = (int32_t *)PyBytes_AS_STRING(c->offsets);
    c->at = PyBytes_AS_STRING(c->data);
    c->off[0] = 0;
    return 1;
}

static void put(StringColumn *c, Py_ssize_t i, const char *s, Py_ssize_t n)
{
    memcpy(c->at + c->off[i], s, (size_t)n);
    c->off[i + 1] = c->off[i] + (int32_t)n;
}

static void put2(StringColumn *c, Py_ssize_t i, const char *a, Py_ssize_t na, const char *b,
                 Py_ssize_t nb)
{
    char *at = c->at + c->off[i];
    memcpy(at, a, (size_t)na);
    memcpy(at + na, b, (size_t)nb);
    c->off[i + 1] = c->off[i] + (int32_t)(na + nb);
}

static PyObject *bytes_of(Py_ssize_t n, size_t width, char **at)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)width);
    if (b != NULL)
        *at = PyBytes_AS_STRING(b);
    return b;
}

/* Rows of one kind in group order. */
static PyObject *trade_columns(const Row *rows, const Py_ssize_t *order, Py_ssize_t n,
                               PyObject *prefixes)
{
    Py_ssize_t id_bytes = 0, msg_bytes = 0, dec_bytes[2] = {0, 0}, vendor_bytes = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        const Row *r = &rows[order[k]];
        id_bytes += r->id.len;
        msg_bytes += r->id.len + PyBytes_GET_SIZE(PyList_GET_ITEM(prefixes, r->sym));
        dec_bytes[0] += r->dec[0].len;
        dec_bytes[1] += r->dec[1].len;
        vendor_bytes += r->event.len + (r->best ? 15 : 16); /* {"E":,"M":true} */
    }
    StringColumn msg = {0}, id = {0}, dec[2] = {{0}}, vendor = {0};
    PyObject *sym = NULL, *ts = NULL, *maker = NULL, *seq = NULL, *recv = NULL, *out = NULL;
    char *sym_at, *ts_at, *maker_at, *seq_at, *recv_at;
    if (!string_column(&msg, n, msg_bytes) || !string_column(&id, n, id_bytes)
        || !string_column(&dec[0], n, dec_bytes[0]) || !string_column(&dec[1], n, dec_bytes[1])
        || !string_column(&vendor, n, vendor_bytes))
        goto done;
    sym = bytes_of(n, 4, &sym_at);
    ts = bytes_of(n, 8, &ts_at);
    maker = bytes_of(n, 1, &maker_at);
    seq = bytes_of(n, 8, &seq_at);
    recv = bytes_of(n, 8, &recv_at);
    if (!sym || !ts || !maker || !seq || !recv)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        const Row *r = &rows[order[k]];
        PyObject *prefix = PyList_GET_ITEM(prefixes, r->sym);
        put2(&msg, k, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix), r->id.at, r->id.len);
        put(&id, k, r->id.at, r->id.len);
        put(&dec[0], k, r->dec[0].at, r->dec[0].len);
        put(&dec[1], k, r->dec[1].at, r->dec[1].len);
        char *v = vendor.at + vendor.off[k];
        memcpy(v, "{\"E\":", 5);
        memcpy(v + 5, r->event.at, (size_t)r->event.len);
        const char *tail = r->best ? ",\"M\":true}" : ",\"M\":false}";
        size_t tail_len = r->best ? 10 : 11;
        memcpy(v + 5 + r->event.len, tail, tail_len);
        vendor.off[k + 1] = vendor.off[k] + (int32_t)(5 + r->event.len + (Py_ssize_t)tail_len);
        int64_t ts_us = r->time_ms * 1000;
        memcpy(sym_at + 4 * k, &r->sym, 4);
        memcpy(ts_at + 8 * k, &ts_us, 8);
        maker_at[k] = (char)r->maker;
        memcpy(seq_at + 8 * k, &r->id_value, 8);
        memcpy(recv_at + 8 * k, &r->received, 8);
    }
    out = Py_BuildValue("(nOOOOOOOOOOOOOOO)", n, sym, msg.offsets, msg.data, id.offsets, id.data,
                        ts, dec[0].offsets, dec[0].data, dec[1].offsets, dec[1].data, maker, seq,
                        recv, vendor.offsets, vendor.data);
done:
    Py_XDECREF(msg.offsets); Py_XDECREF(msg.data);
    Py_XDECREF(id.offsets); Py_XDECREF(id.data);
    Py_XDECREF(dec[0].offsets); Py_XDECREF(dec[0].data);
    Py_XDECREF(dec[1].offsets); Py_XDECREF(dec[1].data);
    Py_XDECREF(vendor.offsets); Py_XDECREF(vendor.data);
    Py_XDECREF(sym); Py_XDECREF(ts); Py_XDECREF(maker); Py_XDECREF(seq); Py_XDECREF(recv);
    return out;
}

static PyObject *quote_columns(const Row *rows, const Py_ssize_t *order, Py_ssize_t n,
                               PyObject *prefixes)
{
    Py_ssize_t msg_bytes = 0, dec_bytes[4] = {0, 0, 0, 0};
    for (Py_ssize_t k = 0; k < n; k++) {
        const Row *r = &rows[order[k]];
        msg_bytes += r->id.len + PyBytes_GET_SIZE(PyList_GET_ITEM(prefixes, r->sym));
        for (int j = 0; j < 4; j++)
            dec_bytes[j] += r->dec[j].len;
    }
    StringColumn msg = {0}, dec[4] = {{0}};
    PyObject *sym = NULL, *seq = NULL, *recv = NULL, *out = NULL;
    char *sym_at, *seq_at, *recv_at;
    if (!string_column(&msg, n, msg_bytes))
        goto done;
    for (int j = 0; j < 4; j++)
        if (!string_column(&dec[j], n, dec_bytes[j]))
            goto done;
    sym = bytes_of(n, 4, &sym_at);
    seq = bytes_of(n, 8, &seq_at);
    recv = bytes_of(n, 8, &recv_at);
    if (!sym || !seq || !recv)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        const Row *r = &rows[order[k]];
        PyObject *prefix = PyList_GET_ITEM(prefixes, r->sym);
        put2(&msg, k, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix), r->id.at, r->id.len);
        for (int j = 0; j < 4; j++)
            put(&dec[j], k, r->dec[j].at, r->dec[j].len);
        memcpy(sym_at + 4 * k, &r->sym, 4);
        memcpy(seq_at + 8 * k, &r->id_value, 8);
        memcpy(recv_at + 8 * k, &r->received, 8);
    }
    out = Py_BuildValue("(nOOOOOOOOOOOOO)", n, sym, msg.offsets, msg.data, dec[0].offsets,
                        dec[0].data, dec[1].offsets, dec[1].data, dec[2].offsets, dec[2].data,
                        dec[3].offsets, dec[3].data, seq, recv);
done:
    Py_XDECREF(msg.offsets); Py_XDECREF(msg.data);
    for (int j = 0; j < 4; j++) {
        Py_XDECREF(dec[j].offsets);
        Py_XDECREF(dec[j].data);
    }
    Py_XDECREF(sym); Py_XDECREF(seq); Py_XDECREF(recv);
    return out;
}

/* scan(frames, received, streams, symbols, trade_prefixes, quote_prefixes, max_skew_us) */
static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *frames, *received, *streams, *symbols, *trade_prefixes, *quote_prefixes;
    long long max_skew_us;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!L", &PyList_Type, &frames, &PyList_Type, &received,
                          &PyDict_Type, &streams, &PyList_Type, &symbols, &PyList_Type,
                          &trade_prefixes, &PyList_Type, &quote_prefixes, &max_skew_us))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(frames);
    Py_ssize_t nsym = PyList_GET_SIZE(symbols);
    if (PyList_GET_SIZE(received) != n || PyList_GET_SIZE(trade_prefixes) != nsym
        || PyList_GET_SIZE(quote_prefixes) != nsym) {
        PyErr_SetString(PyExc_ValueError, "scan: lists of unequal length");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nsym; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(symbols, i))
            || !PyBytes_Check(PyList_GET_ITEM(trade_prefixes, i))
            || !PyBytes_Check(PyList_GET_ITEM(quote_prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "scan: symbols and prefixes must be bytes");
            return NULL;
        }

    PyObject *result = NULL;
    Row *rows = NULL;
    Py_ssize_t *order = NULL, *group_of = NULL, *next = NULL;
    StreamTable table = {NULL, 0};
    size_t size = 8;
    while (size < (size_t)PyDict_GET_SIZE(streams) * 2)
        size *= 2;
    table.slots = calloc(size, sizeof(Stream));
    table.mask = size - 1;
    rows = malloc((size_t)(n ? n : 1) * sizeof(Row));
    order = malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    group_of = malloc((size_t)(2 * nsym + 1) * sizeof(Py_ssize_t));
    next = malloc((size_t)(2 * nsym + 1) * sizeof(Py_ssize_t));
    if (!table.slots || !rows || !order || !group_of || !next) {
        PyErr_NoMemory();
        goto done;
    }
    /* streams: {b"btcusdt@trade": (0, symbol index), b"btcusdt@bookTicker": (1, index)} */
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(streams, &pos, &key, &value)) {
        long kind, sym;
        if (!PyBytes_Check(key) || !PyArg_ParseTuple(value, "ll", &kind, &sym)
            || (kind != TRADE && kind != QUOTE) || sym < 0 || sym >= nsym) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "scan: streams must map bytes to (kind, symbol)");
            goto done;
        }
        const char *k = PyBytes_AS_STRING(key);
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        size_t i = fnv1a(k, klen) & table.mask;
        while (table.slots[i].key != NULL)
            i = (i + 1) & table.mask;
        table.slots[i] = (Stream){k, klen, (int32_t)sym, (uint8_t)kind};
    }

    int64_t max_time_ms = 0;
    Py_ssize_t count[2] = {0, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        PyObject *at = PyList_GET_ITEM(received, i);
        if (!PyBytes_Check(frame) || !PyLong_Check(at)) {
            PyErr_SetString(PyExc_TypeError, "scan: frames are bytes, receive times int");
            goto done;
        }
        int overflow;
        long long recv = PyLong_AsLongLongAndOverflow(at, &overflow);
        if (overflow || (recv == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            result = Py_NewRef(Py_None);
            goto done;
        }
        const char *s = PyBytes_AS_STRING(frame);
        if (!scan_frame(s, s + PyBytes_GET_SIZE(frame), &table, symbols, recv, max_skew_us,
                        &rows[i])) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        count[rows[i].kind]++;
        if (rows[i].kind == TRADE && rows[i].time_ms > max_time_ms)
            max_time_ms = rows[i].time_ms;
    }

    /* Group order: groups (kind, symbol) numbered as each first comes; a stable placement. */
    for (Py_ssize_t g = 0; g < 2 * nsym; g++)
        group_of[g] = -1;
    Py_ssize_t groups = 0, *sizes = next; /* next[] first counts rows per group */
    Py_ssize_t *first_kind = malloc((size_t)(2 * nsym + 1) * sizeof(Py_ssize_t));
    if (first_kind == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t key_index = rows[i].kind * nsym + rows[i].sym;
        if (group_of[key_index] < 0) {
            group_of[key_index] = groups;
            sizes[groups] = 0;
            first_kind[groups] = rows[i].kind;
            groups++;
        }
        sizes[group_of[key_index]]++;
    }
    /* Trades' groups first (in order), then quotes': each kind is its own table. */
    Py_ssize_t at_trade = 0, at_quote = count[TRADE];
    for (Py_ssize_t g = 0; g < groups; g++) {
        Py_ssize_t size_g = sizes[g];
        if (first_kind[g] == TRADE) {
            sizes[g] = at_trade;
            at_trade += size_g;
        } else {
            sizes[g] = at_quote;
            at_quote += size_g;
        }
    }
    free(first_kind);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t g = group_of[rows[i].kind * nsym + rows[i].sym];
        order[sizes[g]++] = i;
    }

    PyObject *trades = count[TRADE]
                           ? trade_columns(rows, order, count[TRADE], trade_prefixes)
                           : Py_NewRef(Py_None);
    if (trades == NULL)
        goto done;
    PyObject *quotes = count[QUOTE] ? quote_columns(rows, order + count[TRADE], count[QUOTE],
                                                    quote_prefixes)
                                    : Py_NewRef(Py_None);
    if (quotes == NULL) {
        Py_DECREF(trades);
        goto done;
    }
    result = Py_BuildValue("(LNN)", (long long)max_time_ms, trades, quotes);
done:
    free(table.slots);
    free(rows);
    free(order);
    free(group_of);
    free(next);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(frames, received, streams, symbols, trade_prefixes, quote_prefixes, max_skew_us)\n"
     "-> (max_time_ms, trade buffers | None, quote buffers | None), or None when a frame\n"
     "is not a valid trade or quote in the venue's own form."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_binance_scan",
    "Binance combined-stream frames to Arrow column buffers (see k2d/venues/binance.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__binance_scan(void)
{
    return PyModule_Create(&module);
}
