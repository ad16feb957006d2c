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
                      const Text *symbols, int64_t received, int64_t max_skew_us, Row *row)
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
    const Text *expected = &symbols[row->sym];
    if (symbol.len != expected->len || memcmp(symbol.at, expected->at, (size_t)symbol.len) != 0)
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

/* A string column: int32 offsets and the bytes. */
typedef struct {
    PyObject *offsets, *data;
    int32_t *off;
    char *at;
} StringColumn;

static void put(StringColumn *c, Py_ssize_t i, const char *s, Py_ssize_t n)
{
    memcpy(c->at + c->off[i], s, (size_t)n);
    c->off[i + 1] = c->off[i] + (int32_t)n;
}

/* One table's buffers: sized and filled without the GIL, allocated and handed over with it.
 * fixed: symbol index (int32), id (int64), receive time (int64), and for trades the time in
 * microseconds (int64) and `m` (uint8). text: message_id, then trades' trade_id, price,
 * quantity and vendor_data, or quotes' bid, bid quantity, ask, ask quantity. */
typedef struct {
    int kind, nfixed;
    Py_ssize_t n;
    size_t width[5];
    PyObject *fixed[5];
    char *fixed_at[5];
    Py_ssize_t text_bytes[5];
    StringColumn text[5];
} Columns;

enum { NTEXT = 5 };

static void columns_size(Columns *c, int kind, const Row *rows, const Py_ssize_t *order,
                         Py_ssize_t n, const Text *prefixes)
{
    static const size_t trade_widths[5] = {4, 8, 8, 8, 1}, quote_widths[3] = {4, 8, 8};
    memset(c, 0, sizeof *c);
    c->kind = kind;
    c->n = n;
    c->nfixed = kind == TRADE ? 5 : 3;
    memcpy(c->width, kind == TRADE ? trade_widths : quote_widths, (size_t)c->nfixed * sizeof(size_t));
    for (Py_ssize_t k = 0; k < n; k++) {
        const Row *r = &rows[order[k]];
        c->text_bytes[0] += prefixes[r->sym].len + r->id.len;
        if (kind == TRADE) {
            c->text_bytes[1] += r->id.len;
            c->text_bytes[2] += r->dec[0].len;
            c->text_bytes[3] += r->dec[1].len;
            c->text_bytes[4] += r->event.len + (r->best ? 15 : 16); /* {"E":,"M":true} */
        } else {
            for (int j = 0; j < 4; j++)
                c->text_bytes[1 + j] += r->dec[j].len;
        }
    }
}

static void columns_free(Columns *c)
{
    for (int i = 0; i < c->nfixed; i++)
        Py_CLEAR(c->fixed[i]);
    for (int i = 0; i < NTEXT; i++) {
        Py_CLEAR(c->text[i].offsets);
        Py_CLEAR(c->text[i].data);
    }
}

static int columns_alloc(Columns *c)
{
    for (int i = 0; i < NTEXT; i++) {
        StringColumn *t = &c->text[i];
        if (c->text_bytes[i] > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "a batch's text column over 2 GiB");
            return 0;
        }
        t->offsets = PyBytes_FromStringAndSize(NULL, (c->n + 1) * 4);
        t->data = PyBytes_FromStringAndSize(NULL, c->text_bytes[i]);
        if (t->offsets == NULL || t->data == NULL)
            return 0;
        t->off = (int32_t *)PyBytes_AS_STRING(t->offsets);
        t->at = PyBytes_AS_STRING(t->data);
        t->off[0] = 0;
    }
    for (int i = 0; i < c->nfixed; i++) {
        c->fixed[i] = PyBytes_FromStringAndSize(NULL, c->n * (Py_ssize_t)c->width[i]);
        if (c->fixed[i] == NULL)
            return 0;
        c->fixed_at[i] = PyBytes_AS_STRING(c->fixed[i]);
    }
    return 1;
}

static void columns_fill(Columns *c, const Row *rows, const Py_ssize_t *order,
                         const Text *prefixes)
{
    for (Py_ssize_t k = 0; k < c->n; k++) {
        const Row *r = &rows[order[k]];
        const Text *prefix = &prefixes[r->sym];
        StringColumn *msg = &c->text[0];
        char *at = msg->at + msg->off[k];
        memcpy(at, prefix->at, (size_t)prefix->len);
        memcpy(at + prefix->len, r->id.at, (size_t)r->id.len);
        msg->off[k + 1] = msg->off[k] + (int32_t)(prefix->len + r->id.len);
        memcpy(c->fixed_at[0] + 4 * k, &r->sym, 4);
        memcpy(c->fixed_at[1] + 8 * k, &r->id_value, 8);
        memcpy(c->fixed_at[2] + 8 * k, &r->received, 8);
        if (c->kind == QUOTE) {
            for (int j = 0; j < 4; j++)
                put(&c->text[1 + j], k, r->dec[j].at, r->dec[j].len);
            continue;
        }
        int64_t ts_us = r->time_ms * 1000;
        memcpy(c->fixed_at[3] + 8 * k, &ts_us, 8);
        c->fixed_at[4][k] = (char)r->maker;
        put(&c->text[1], k, r->id.at, r->id.len);
        put(&c->text[2], k, r->dec[0].at, r->dec[0].len);
        put(&c->text[3], k, r->dec[1].at, r->dec[1].len);
        StringColumn *vendor = &c->text[4];
        char *v = vendor->at + vendor->off[k];
        const char *tail = r->best ? ",\"M\":true}" : ",\"M\":false}";
        Py_ssize_t tail_len = r->best ? 10 : 11;
        memcpy(v, "{\"E\":", 5);
        memcpy(v + 5, r->event.at, (size_t)r->event.len);
        memcpy(v + 5 + r->event.len, tail, (size_t)tail_len);
        vendor->off[k + 1] = vendor->off[k] + (int32_t)(5 + r->event.len + tail_len);
    }
}

/* (n, fixed buffers..., then each text column's offsets and bytes); the buffers go with it. */
static PyObject *columns_tuple(Columns *c)
{
    PyObject *t = PyTuple_New(1 + c->nfixed + 2 * NTEXT);
    PyObject *n = PyLong_FromSsize_t(c->n);
    if (t == NULL || n == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(n);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, n);
    for (int i = 0; i < c->nfixed; i++) {
        PyTuple_SET_ITEM(t, 1 + i, c->fixed[i]);
        c->fixed[i] = NULL;
    }
    for (int i = 0; i < NTEXT; i++) {
        PyTuple_SET_ITEM(t, 1 + c->nfixed + 2 * i, c->text[i].offsets);
        PyTuple_SET_ITEM(t, 2 + c->nfixed + 2 * i, c->text[i].data);
        c->text[i].offsets = c->text[i].data = NULL;
    }
    return t;
}

/* Every bytes object the scan reads is held (a new reference each) while the GIL is let go:
 * no other thread can free it meanwhile. */
typedef struct {
    PyObject **objects;
    Py_ssize_t n;
} Held;

static int hold_text(Held *h, PyObject *b, Text *out)
{
    if (!PyBytes_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "scan: frames, stream names, symbols and prefixes are bytes");
        return 0;
    }
    h->objects[h->n++] = Py_NewRef(b);
    out->at = PyBytes_AS_STRING(b);
    out->len = PyBytes_GET_SIZE(b);
    return 1;
}

/* Rows grouped (kind, symbol), groups numbered as each first comes; trades' rows first. */
static int group(const Row *rows, Py_ssize_t n, Py_ssize_t nsym, const Py_ssize_t count[2],
                 Py_ssize_t *order)
{
    Py_ssize_t *group_of = malloc((size_t)(2 * nsym + 1) * sizeof(Py_ssize_t));
    Py_ssize_t *at = malloc((size_t)(2 * nsym + 1) * sizeof(Py_ssize_t));
    int *kind_of = malloc((size_t)(2 * nsym + 1) * sizeof(int));
    if (group_of == NULL || at == NULL || kind_of == NULL) {
        free(group_of);
        free(at);
        free(kind_of);
        return 0;
    }
    Py_ssize_t groups = 0;
    for (Py_ssize_t g = 0; g < 2 * nsym; g++)
        group_of[g] = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t key = rows[i].kind * nsym + rows[i].sym;
        if (group_of[key] < 0) {
            group_of[key] = groups;
            at[groups] = 0;
            kind_of[groups] = rows[i].kind;
            groups++;
        }
        at[group_of[key]]++;
    }
    Py_ssize_t next[2] = {0, count[TRADE]};
    for (Py_ssize_t g = 0; g < groups; g++) {
        Py_ssize_t size = at[g];
        at[g] = next[kind_of[g]];
        next[kind_of[g]] += size;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        order[at[group_of[rows[i].kind * nsym + rows[i].sym]]++] = i;
    free(group_of);
    free(at);
    free(kind_of);
    return 1;
}

/* scan(frames, received, streams, symbols, trade_prefixes, quote_prefixes, max_skew_us,
 *      max_frame_bytes) */
static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *frames, *received, *streams, *symbols, *trade_prefixes, *quote_prefixes;
    long long max_skew_us;
    Py_ssize_t max_frame;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!Ln", &PyList_Type, &frames, &PyList_Type, &received,
                          &PyDict_Type, &streams, &PyList_Type, &symbols, &PyList_Type,
                          &trade_prefixes, &PyList_Type, &quote_prefixes, &max_skew_us,
                          &max_frame))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(frames), nsym = PyList_GET_SIZE(symbols);
    Py_ssize_t nstreams = PyDict_GET_SIZE(streams);
    if (PyList_GET_SIZE(received) != n || PyList_GET_SIZE(trade_prefixes) != nsym
        || PyList_GET_SIZE(quote_prefixes) != nsym) {
        PyErr_SetString(PyExc_ValueError, "scan: lists of unequal length");
        return NULL;
    }

    PyObject *result = NULL;
    Held held = {NULL, 0};
    Text *names = NULL, *texts = NULL;
    int64_t *at = NULL;
    Row *rows = NULL;
    Py_ssize_t *order = NULL;
    Columns out[2];
    memset(out, 0, sizeof out);
    StreamTable table = {NULL, 0};
    size_t size = 8;
    while (size < (size_t)nstreams * 2)
        size *= 2;
    table.slots = calloc(size, sizeof(Stream));
    table.mask = size - 1;
    held.objects = malloc((size_t)(n + nstreams + 3 * nsym + 1) * sizeof(PyObject *));
    names = malloc((size_t)(3 * nsym + 1) * sizeof(Text)); /* symbols, trade, quote prefixes */
    texts = malloc((size_t)(n + 1) * sizeof(Text));
    at = malloc((size_t)(n + 1) * sizeof(int64_t));
    rows = malloc((size_t)(n + 1) * sizeof(Row));
    order = malloc((size_t)(n + 1) * sizeof(Py_ssize_t));
    if (!table.slots || !held.objects || !names || !texts || !at || !rows || !order) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nsym; i++)
        if (!hold_text(&held, PyList_GET_ITEM(symbols, i), &names[i])
            || !hold_text(&held, PyList_GET_ITEM(trade_prefixes, i), &names[nsym + i])
            || !hold_text(&held, PyList_GET_ITEM(quote_prefixes, i), &names[2 * nsym + i]))
            goto done;
    /* streams: {b"btcusdt@trade": (0, symbol index), b"btcusdt@bookTicker": (1, index)} */
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(streams, &pos, &key, &value)) {
        long kind, sym;
        Text name;
        if (!hold_text(&held, key, &name))
            goto done;
        if (!PyArg_ParseTuple(value, "ll", &kind, &sym) || (kind != TRADE && kind != QUOTE)
            || sym < 0 || sym >= nsym) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "scan: streams map bytes to (kind, symbol)");
            goto done;
        }
        size_t i = fnv1a(name.at, name.len) & table.mask;
        while (table.slots[i].key != NULL)
            i = (i + 1) & table.mask;
        table.slots[i] = (Stream){name.at, name.len, (int32_t)sym, (uint8_t)kind};
    }
    int fits = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *time = PyList_GET_ITEM(received, i);
        if (!hold_text(&held, PyList_GET_ITEM(frames, i), &texts[i]))
            goto done;
        if (!PyLong_Check(time)) {
            PyErr_SetString(PyExc_TypeError, "scan: receive times are int");
            goto done;
        }
        int overflow;
        at[i] = PyLong_AsLongLongAndOverflow(time, &overflow);
        /* A receive time far from any clock (|t| > 2^62 us, 146,000 years), one not an int64,
         * or a frame too large: the Python parser's to judge. The bound keeps the skew's
         * arithmetic inside int64. */
        if (overflow || at[i] > ((int64_t)1 << 62) || at[i] < -((int64_t)1 << 62)
            || texts[i].len > max_frame)
            fits = 0;
    }

    int scanned = fits;
    Py_ssize_t count[2] = {0, 0};
    int64_t max_time_ms = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; scanned && i < n; i++) {
        const char *s = texts[i].at;
        scanned = scan_frame(s, s + texts[i].len, &table, names, at[i], max_skew_us, &rows[i]);
        if (scanned) {
            count[rows[i].kind]++;
            if (rows[i].kind == TRADE && rows[i].time_ms > max_time_ms)
                max_time_ms = rows[i].time_ms;
        }
    }
    if (scanned && group(rows, n, nsym, count, order) == 0)
        scanned = -1;
    if (scanned > 0) {
        columns_size(&out[TRADE], TRADE, rows, order, count[TRADE], &names[nsym]);
        columns_size(&out[QUOTE], QUOTE, rows, order + count[TRADE], count[QUOTE],
                     &names[2 * nsym]);
    }
    Py_END_ALLOW_THREADS
    if (scanned < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (!scanned) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (int k = 0; k < 2; k++)
        if (out[k].n && !columns_alloc(&out[k]))
            goto done;
    Py_BEGIN_ALLOW_THREADS
    if (out[TRADE].n)
        columns_fill(&out[TRADE], rows, order, &names[nsym]);
    if (out[QUOTE].n)
        columns_fill(&out[QUOTE], rows, order + count[TRADE], &names[2 * nsym]);
    Py_END_ALLOW_THREADS
    PyObject *made[2] = {NULL, NULL};
    for (int k = 0; k < 2; k++) {
        made[k] = out[k].n ? columns_tuple(&out[k]) : Py_NewRef(Py_None);
        if (made[k] == NULL) {
            Py_XDECREF(made[0]);
            goto done;
        }
    }
    result = Py_BuildValue("(LNN)", (long long)max_time_ms, made[TRADE], made[QUOTE]);
done:
    columns_free(&out[TRADE]);
    columns_free(&out[QUOTE]);
    for (Py_ssize_t i = 0; i < held.n; i++)
        Py_DECREF(held.objects[i]);
    free(held.objects);
    free(table.slots);
    free(names);
    free(texts);
    free(at);
    free(rows);
    free(order);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(frames, received, streams, symbols, trade_prefixes, quote_prefixes, max_skew_us,\n"
     "     max_frame_bytes)\n"
     "-> (max_time_ms, trade buffers | None, quote buffers | None), or None when a frame\n"
     "is not a valid trade or quote in the venue's own form. The GIL is let go while it\n"
     "scans and fills."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_binance_scan",
    "Binance combined-stream frames to Arrow column buffers (see k2d/venues/binance.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__binance_scan(void)
{
    return PyModule_Create(&module);
}
