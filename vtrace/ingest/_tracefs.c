/*
 * Compiled reader of tracefs event lines (vtrace.ingest._tracefs).
 *
 * One pass over a text file's bytes, line by line. A line is *accepted* only when this code
 * is sure of every field: printable ASCII, the fixed-width header tracefs writes
 * ("%16s-%-7d [%03d] FLAGS %5lu.%06lu: EVENT: TEXT", seconds up to 10 digits), an event
 * name of word characters, and, for the kvm events below, a text that has exactly the shape
 * of the pattern in vtrace/ingest/kvm_payloads.py with every number fitting its column.
 * Every other line (comments, damage, NUL bytes, other layouts, unusual texts, malformed
 * events...) is handed back, with its line number and place, to the polars parser, which
 * decides everything about it. So this code never has to be right about a bad line, only
 * about the lines it takes.
 *
 * Columns are written into buffers the caller allocated (numpy arrays, any object with the
 * writable buffer protocol). Strings are Arrow "string view" entries (16 bytes each) that
 * point into the file's bytes: no text is copied. Event names and reason names are small
 * dictionaries returned as lists of bytes, the columns hold their indices. The GIL is
 * released while the lines are read.
 *
 * Only the CPython stable C API and the buffer protocol are used (no numpy headers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bumped whenever what is accepted or how columns are written changes; the Python side
 * refuses a module built from another version of this file. */
#define TRACEFS_ABI 1

/* Bits of the per-row "valid" mask: which nullable columns hold a value. */
enum {
    V_VCPU = 1 << 0,
    V_REASON = 1 << 1,
    V_REASON_NAME = 1 << 2,
    V_ISA = 1 << 3,
    V_FLAGS = 1 << 4,
    V_ADDR = 1 << 5,
    V_SIZE = 1 << 6,
    V_WRITE = 1 << 7,
    V_VALUE = 1 << 8,
    V_COUNT = 1 << 9,
    V_RIP = 1 << 10,
    V_RAW = 1 << 11,
};

/* What the event name says about the text. */
enum kind {
    K_OTHER = 0, /* no pattern: the text goes to raw */
    K_REFUSE,    /* a pattern this code does not know: every such line goes to polars */
    K_EXIT,
    K_ENTRY,
    K_PIO,
    K_MMIO,
    K_FAST_MMIO,
    K_USERSPACE_EXIT,
    K_SET_IRQ,
    K_MSI_SET_IRQ,
    K_INJ_VIRQ,
    K_EMULATE_INSN,
};

static const struct {
    const char *name;
    enum kind kind;
} KNOWN[] = {
    {"kvm_exit", K_EXIT},
    {"kvm_entry", K_ENTRY},
    {"kvm_pio", K_PIO},
    {"kvm_mmio", K_MMIO},
    {"kvm_fast_mmio", K_FAST_MMIO},
    {"kvm_userspace_exit", K_USERSPACE_EXIT},
    {"kvm_set_irq", K_SET_IRQ},
    {"kvm_msi_set_irq", K_MSI_SET_IRQ},
    {"kvm_inj_virq", K_INJ_VIRQ},
    {"kvm_emulate_insn", K_EMULATE_INSN},
};
#define N_KNOWN (sizeof KNOWN / sizeof KNOWN[0])

/* Layout constants, as in vtrace/ingest/tracefs_layout.py. */
#define TID_WIDTH 7
#define CPU_WIDTH 3
#define SEC_WIDTH 5
#define USEC_WIDTH 6
#define STAMP_WIDTH (1 + SEC_WIDTH + 1 + USEC_WIDTH)
#define WIDE_SEC_MAX 10
#define NAME_WINDOW 64
#define NS_PER_S 1000000000LL
#define MAX_SECONDS 9223372036LL /* (2**63 - 1) // 10**9 */
#define HEX_MAX 16               /* digits: 64 bits */
#define DEC_MAX 18               /* digits: fits Int64 */
#define INT32_MAX_V 2147483647LL
#define MSI_ADDRESS_BASE 0xFEE00000ULL
/* Distinct event names / reason names kept; a line with one more is handed back. */
#define DICT_MAX 4096
/* Views hold 32-bit offsets: the file is seen as overlapping buffers of 2 GiB starting
 * every 1 GiB, so a string of less than 1 GiB always lies within one of them. */
#define VIEW_SHIFT 30

/* ---- small dictionaries (open addressing) ------------------------------------------- */

typedef struct {
    const char *s;
    Py_ssize_t n;
    int kind;      /* events: enum kind; names: unused */
} entry;

typedef struct {
    entry *e;        /* in insertion order: the index is the code */
    int32_t *slots;  /* hash slots -> index, -1 empty */
    Py_ssize_t len, cap_slots;
} dict;

#define HASH_START 1469598103934665603ULL
#define HASH_STEP(h, ch) (((h) ^ (unsigned char)(ch)) * 1099511628211ULL)

static uint64_t hash_bytes(const char *s, Py_ssize_t n) {
    uint64_t h = HASH_START;
    for (Py_ssize_t i = 0; i < n; i++) h = HASH_STEP(h, s[i]);
    return h;
}

static int dict_init(dict *d) {
    d->cap_slots = 2 * DICT_MAX * 2;
    d->e = malloc(sizeof(entry) * (DICT_MAX + 64));
    d->slots = malloc(sizeof(int32_t) * d->cap_slots);
    d->len = 0;
    if (!d->e || !d->slots) return -1;
    for (Py_ssize_t i = 0; i < d->cap_slots; i++) d->slots[i] = -1;
    return 0;
}

static void dict_free(dict *d) {
    free(d->e);
    free(d->slots);
}

/* Index of (s, n), whose hash_bytes is h; -1 when absent and `add` is 0 or the dictionary
 * is full. */
static int32_t dict_find_h(dict *d, const char *s, Py_ssize_t n, uint64_t h, int add, int kind,
                           int limit) {
    Py_ssize_t mask = d->cap_slots - 1;
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)mask);
    for (;;) {
        int32_t at = d->slots[i];
        if (at < 0) break;
        if (d->e[at].n == n && memcmp(d->e[at].s, s, (size_t)n) == 0) return at;
        i = (i + 1) & mask;
    }
    if (!add || d->len >= limit) return -1;
    d->e[d->len].s = s;
    d->e[d->len].n = n;
    d->e[d->len].kind = kind;
    d->slots[i] = (int32_t)d->len;
    return (int32_t)d->len++;
}

static int32_t dict_find(dict *d, const char *s, Py_ssize_t n, int add, int kind, int limit) {
    return dict_find_h(d, s, n, hash_bytes(s, n), add, kind, limit);
}

/* ---- output ------------------------------------------------------------------------- */

typedef struct {
    uint32_t *lineno;
    int64_t *ts_ns;
    int32_t *tid;
    int16_t *cpu;
    uint32_t *event;
    int32_t *vcpu;
    int64_t *reason;
    uint32_t *reason_name;
    uint32_t *isa;
    int64_t *flags;
    uint64_t *addr;
    int32_t *size;
    uint8_t *write;
    uint64_t *value;
    int32_t *count;
    uint64_t *rip;
    uint8_t *raw; /* 16-byte views */
    uint16_t *valid;
    /* lines handed back */
    uint32_t *rest_lineno;
    int64_t *rest_start;
    uint8_t *rest_view;
} columns;

/* One row's values before they are committed (a line may still be refused). */
typedef struct {
    int64_t ts_ns;
    int32_t tid;
    int16_t cpu;
    uint32_t event;
    int32_t vcpu;
    int64_t reason;
    uint32_t reason_name;
    uint32_t isa;
    int64_t flags;
    uint64_t addr;
    int32_t size;
    uint8_t write;
    uint64_t value;
    int32_t count;
    uint64_t rip;
    uint16_t valid;
    const char *raw;
    Py_ssize_t raw_n;
} row;

/* Reason texts of kvm_exit: key -> decoded columns (from the Python lookup table). */
typedef struct {
    int64_t reason;
    int64_t flags;
    int32_t name; /* index in the names dictionary, -1: null */
    int32_t isa;
    int has_reason, has_flags;
} exit_reason;

typedef struct {
    const char *base;
    Py_ssize_t size;
    columns c;
    Py_ssize_t capacity;
    dict events;
    dict names;    /* reason_name and isa values */
    dict reasons;  /* kvm_exit reason texts */
    exit_reason *reason_rows;
    dict refused;  /* event names with a pattern this code does not know */
    int32_t fixed_names; /* entries of `names` that come from the lookup table */
    /* seen in the lines handed back */
    int has_cr, has_unit_sep, has_nul, non_ascii;
} state;

static void put_view(uint8_t *v, const char *base, const char *s, Py_ssize_t n) {
    int32_t len = (int32_t)n;
    memcpy(v, &len, 4);
    if (n <= 12) {
        memset(v + 4, 0, 12);
        memcpy(v + 4, s, (size_t)n);
    } else {
        Py_ssize_t off = s - base;
        int32_t buf = (int32_t)(off >> VIEW_SHIFT);
        int32_t at = (int32_t)(off & ((1LL << VIEW_SHIFT) - 1));
        memcpy(v + 4, s, 4);
        memcpy(v + 8, &buf, 4);
        memcpy(v + 12, &at, 4);
    }
}

/* ---- field readers: each advances *i past what it read, or returns 0 ------------------ */

static inline int is_digit(unsigned char ch) { return (unsigned char)(ch - '0') <= 9; }

static inline int hex_value(unsigned char ch) {
    if (is_digit(ch)) return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static inline int lit(const char *p, Py_ssize_t n, Py_ssize_t *i, const char *s, Py_ssize_t k) {
    if (n - *i < k || memcmp(p + *i, s, (size_t)k) != 0) return 0;
    *i += k;
    return 1;
}
#define LIT(s) lit(p, n, &i, s, (Py_ssize_t)(sizeof(s) - 1))

/* The whole run of decimal digits at *i: 1 to DEC_MAX of them (a longer run is no match of
 * `\d{1,18}` before a literal that is not a digit). */
static inline int dec(const char *p, Py_ssize_t n, Py_ssize_t *i, int64_t *out) {
    Py_ssize_t j = *i;
    int64_t v = 0;
    while (j < n && is_digit((unsigned char)p[j])) {
        if (j - *i >= DEC_MAX) return 0;
        v = v * 10 + (p[j] - '0');
        j++;
    }
    if (j == *i) return 0;
    *out = v;
    *i = j;
    return 1;
}

/* `-?\d{1,18}`. */
static inline int sdec(const char *p, Py_ssize_t n, Py_ssize_t *i, int64_t *out) {
    Py_ssize_t j = *i;
    int neg = j < n && p[j] == '-';
    if (neg) j++;
    int64_t v;
    if (!dec(p, n, &j, &v)) return 0;
    *out = neg ? -v : v;
    *i = j;
    return 1;
}

/* The whole run of hex digits at *i: 1 to HEX_MAX of them. */
static inline int hex(const char *p, Py_ssize_t n, Py_ssize_t *i, uint64_t *out) {
    Py_ssize_t j = *i;
    uint64_t v = 0;
    int h;
    while (j < n && (h = hex_value((unsigned char)p[j])) >= 0) {
        if (j - *i >= HEX_MAX) return 0;
        v = (v << 4) | (uint64_t)h;
        j++;
    }
    if (j == *i) return 0;
    *out = v;
    *i = j;
    return 1;
}

static inline int ends_with(const char *p, Py_ssize_t n, const char *s, Py_ssize_t k) {
    return n >= k && memcmp(p + n - k, s, (size_t)k) == 0;
}
#define ENDS(s) ends_with(p, n, s, (Py_ssize_t)(sizeof(s) - 1))

/* After the last field with a column: a blank or the end (`(?:\s|$)`; only printable
 * ASCII reaches here, so the one blank is the space). */
#define MORE_OK (i == n || p[i] == ' ')
#define END_OK (i == n)

/* ---- payloads: 1 = the text has this shape and every value fits; 0 = hand it back ----- */

static int p_exit(state *st, const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t vcpu;
    if (LIT("vcpu ")) {
        if (!dec(p, n, &i, &vcpu) || vcpu > INT32_MAX_V) return 0;
        if (!LIT(" ")) return 0;
        r->vcpu = (int32_t)vcpu;
        r->valid |= V_VCPU;
    }
    if (!LIT("reason ")) return 0;
    Py_ssize_t name = i;
    uint64_t h = HASH_START;
    while (i < n && p[i] != ' ') h = HASH_STEP(h, p[i]), i++;
    if (i == name) return 0;
    int32_t at = dict_find_h(&st->reasons, p + name, i - name, h, 0, 0, 0);
    if (at < 0) return 0; /* codes in hex, two-word names, unknown names: polars */
    exit_reason *x = &st->reason_rows[at];
    if (!x->has_reason) return 0;
    if (!LIT(" rip 0x") || !hex(p, n, &i, &r->rip) || !MORE_OK) return 0;
    r->valid |= V_RIP | V_REASON | V_RAW;
    r->reason = x->reason;
    if (x->has_flags) {
        r->flags = x->flags;
        r->valid |= V_FLAGS;
    }
    if (x->name >= 0) {
        r->reason_name = (uint32_t)x->name;
        r->valid |= V_REASON_NAME;
    }
    if (x->isa >= 0) {
        r->isa = (uint32_t)x->isa;
        r->valid |= V_ISA;
    }
    return 1;
}

static int p_entry(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t vcpu;
    if (!LIT("vcpu ") || !dec(p, n, &i, &vcpu) || vcpu > INT32_MAX_V) return 0;
    if (!LIT(", rip 0x") || !hex(p, n, &i, &r->rip) || !MORE_OK) return 0;
    r->vcpu = (int32_t)vcpu;
    r->flags = ENDS("[immediate exit]");
    r->valid |= V_VCPU | V_RIP | V_FLAGS | V_RAW;
    return 1;
}

static int p_pio(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t size, count;
    if (!LIT("pio_")) return 0;
    if (LIT("read"))
        r->write = 0;
    else if (LIT("write"))
        r->write = 1;
    else
        return 0;
    if (!LIT(" at 0x") || !hex(p, n, &i, &r->addr)) return 0;
    /* A negative size is rare and left to polars. */
    if (!LIT(" size ") || !dec(p, n, &i, &size) || size > INT32_MAX_V) return 0;
    if (!LIT(" count ") || !dec(p, n, &i, &count) || count > INT32_MAX_V) return 0;
    if (!LIT(" val 0x") || !hex(p, n, &i, &r->value)) return 0;
    if (!END_OK && !(LIT(" (...)") && END_OK)) return 0;
    r->size = (int32_t)size;
    r->count = (int32_t)count;
    r->valid |= V_WRITE | V_ADDR | V_SIZE | V_COUNT | V_VALUE;
    return 1;
}

static int p_mmio(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t len;
    if (!LIT("mmio ")) return 0;
    if (LIT("unsatisfied-read"))
        r->flags = 0;
    else if (LIT("read"))
        r->flags = 1;
    else if (LIT("write"))
        r->flags = 2;
    else
        return 0;
    r->write = r->flags == 2;
    if (!LIT(" len ") || !dec(p, n, &i, &len) || len > INT32_MAX_V) return 0;
    if (!LIT(" gpa 0x") || !hex(p, n, &i, &r->addr)) return 0;
    if (!LIT(" val 0x") || !hex(p, n, &i, &r->value) || !END_OK) return 0;
    r->size = (int32_t)len;
    r->valid |= V_WRITE | V_FLAGS | V_ADDR | V_SIZE | V_VALUE;
    return 1;
}

static int p_fast_mmio(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    if (!LIT("fast mmio at gpa 0x") || !hex(p, n, &i, &r->addr) || !END_OK) return 0;
    r->write = 1;
    r->valid |= V_ADDR | V_WRITE;
    return 1;
}

static int p_userspace_exit(state *st, const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t code;
    if (!LIT("reason ")) return 0;
    Py_ssize_t name = i;
    while (i < n && p[i] != ' ') i++;
    Py_ssize_t name_n = i - name;
    if (name_n == 0) return 0;
    if (!LIT(" (") || !sdec(p, n, &i, &code) || !LIT(")") || !END_OK) return 0;
    int32_t at = dict_find(&st->names, p + name, name_n, 1, 0, DICT_MAX);
    if (at < 0) return 0;
    r->reason_name = (uint32_t)at;
    int failed = (name_n == 7 && memcmp(p + name, "restart", 7) == 0) ||
                 (name_n == 5 && memcmp(p + name, "error", 5) == 0);
    if (failed) {
        r->flags = -code;
    } else {
        r->reason = code;
        r->flags = 0;
        r->valid |= V_REASON;
    }
    r->valid |= V_REASON_NAME | V_FLAGS;
    return 1;
}

static int p_set_irq(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t gsi, level, src;
    if (!LIT("gsi ") || !dec(p, n, &i, &gsi)) return 0;
    /* level goes to an unsigned column: a negative one is malformed, polars says so. */
    if (!LIT(" level ") || !dec(p, n, &i, &level)) return 0;
    if (!LIT(" source ") || !sdec(p, n, &i, &src) || !END_OK) return 0;
    r->addr = (uint64_t)gsi;
    r->value = (uint64_t)level;
    r->flags = src;
    r->valid |= V_ADDR | V_VALUE | V_FLAGS;
    return 1;
}

static const char *const MODES[] = {"Fixed", "LowPrio", "SMI", "Res3",
                                    "NMI",   "INIT",    "SIPI", "ExtINT"};

static int p_msi_set_irq(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0, start;
    uint64_t dst;
    int64_t vec;
    int mode = -1;
    if (!LIT("dst ")) return 0;
    start = i;
    /* More than 32 bits of dst is left to polars (the address would not fit). */
    if (!hex(p, n, &i, &dst) || i - start > 8) return 0;
    if (!LIT(" vec ") || !dec(p, n, &i, &vec) || !LIT(" (")) return 0;
    for (int m = 0; m < 8; m++) {
        Py_ssize_t k = (Py_ssize_t)strlen(MODES[m]);
        if (lit(p, n, &i, MODES[m], k)) {
            mode = m;
            break;
        }
    }
    if (mode < 0 || !LIT("|")) return 0;
    uint64_t logical;
    if (LIT("logical"))
        logical = 1;
    else if (LIT("physical"))
        logical = 0;
    else
        return 0;
    if (!LIT("|")) return 0;
    uint64_t level;
    if (LIT("level"))
        level = 1;
    else if (LIT("edge"))
        level = 0;
    else
        return 0;
    uint64_t rh = LIT("|rh") ? 1 : 0;
    if (!LIT(")") || !END_OK) return 0;
    r->addr = MSI_ADDRESS_BASE | ((dst & 0xFF) << 12) | ((dst & ~(uint64_t)0xFF) << 32) |
              (logical << 2) | (rh << 3);
    r->value = (uint64_t)vec | ((uint64_t)mode << 8) | (level << 15);
    r->valid |= V_ADDR | V_VALUE | V_RAW;
    return 1;
}

static int p_inj_virq(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    int64_t soft;
    if (LIT("IRQ 0x"))
        soft = 0;
    else if (LIT("Soft/INTn 0x"))
        soft = 1;
    else
        return 0;
    if (!hex(p, n, &i, &r->value)) return 0;
    int64_t re = LIT(" [reinjected]") ? 1 : 0;
    if (!END_OK) return 0;
    r->flags = soft | (re << 1);
    r->valid |= V_VALUE | V_FLAGS;
    return 1;
}

static int p_emulate_insn(const char *p, Py_ssize_t n, row *r) {
    Py_ssize_t i = 0;
    uint64_t cs;
    if (!hex(p, n, &i, &cs) || !LIT(":") || !hex(p, n, &i, &r->rip) || !LIT(":")) return 0;
    r->flags = ENDS(" failed") || ENDS(" FAIL");
    r->valid |= V_RIP | V_FLAGS | V_RAW;
    return 1;
}

/* ---- one line -------------------------------------------------------------------------- */

/* Digits then blanks (`%-7d`), at least one digit. */
static inline int left_aligned(const char *s, int w, int32_t *out) {
    int32_t v = 0;
    int k = 0;
    while (k < w && is_digit((unsigned char)s[k])) v = v * 10 + (s[k++] - '0');
    if (k == 0) return 0;
    for (; k < w; k++)
        if (s[k] != ' ') return 0;
    *out = v;
    return 1;
}

/* Blanks then digits (`%5lu`), at least one digit. */
static inline int right_aligned(const char *s, int w, int64_t *out) {
    int64_t v = 0;
    int k = 0;
    while (k < w && s[k] == ' ') k++;
    if (k == w) return 0;
    for (; k < w; k++) {
        if (!is_digit((unsigned char)s[k])) return 0;
        v = v * 10 + (s[k] - '0');
    }
    *out = v;
    return 1;
}

/* Exactly w digits (`%03d`, `%06lu`). */
static inline int fixed_digits(const char *s, int w, int64_t *out) {
    int64_t v = 0;
    for (int k = 0; k < w; k++) {
        if (!is_digit((unsigned char)s[k])) return 0;
        v = v * 10 + (s[k] - '0');
    }
    *out = v;
    return 1;
}

static inline int is_word(unsigned char ch) {
    return is_digit(ch) || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}

/* Where ": " first occurs in s[0..n), or -1. */
static inline Py_ssize_t find_colon_blank(const char *s, Py_ssize_t n) {
    const char *at = s, *end = s + n;
    while (at < end) {
        const char *c = memchr(at, ':', (size_t)(end - at));
        if (!c || c + 1 >= end) return -1;
        if (c[1] == ' ') return c - s;
        at = c + 1;
    }
    return -1;
}

/* 1: the line is printable ASCII (0x20..0x7e). Written so the compiler vectorises it. */
static inline int printable(const char *s, Py_ssize_t n) {
    unsigned char bad = 0;
    for (Py_ssize_t k = 0; k < n; k++) bad |= (unsigned char)((unsigned char)s[k] - 0x20) > 0x5e;
    return !bad;
}

static int parse_line(state *st, const char *line, Py_ssize_t len, row *r) {
    if (!printable(line, len)) return 0;
    const char *bp = memchr(line, '[', (size_t)len);
    if (!bp) return 0;
    Py_ssize_t b = bp - line;
    Py_ssize_t c = find_colon_blank(line, len);
    if (c < 0 || b < TID_WIDTH + 2 || c - STAMP_WIDTH < b + CPU_WIDTH + 2) return 0;

    /* "-" TID "] [" CPU "]": 14 bytes ending at the "]" after the CPU. */
    const char *head = line + b - TID_WIDTH - 2;
    int64_t cpu, usec, sec;
    if (head[0] != '-' || head[TID_WIDTH + 1] != ' ' || head[TID_WIDTH + 3 + CPU_WIDTH] != ']')
        return 0;
    if (!left_aligned(head + 1, TID_WIDTH, &r->tid)) return 0;
    if (!fixed_digits(head + TID_WIDTH + 3, CPU_WIDTH, &cpu)) return 0;
    r->cpu = (int16_t)cpu;

    /* " " SEC "." USEC right before ": "; seconds wider than 5 digits start after a blank. */
    const char *stamp = line + c - STAMP_WIDTH;
    if (stamp[1 + SEC_WIDTH] != '.' || !fixed_digits(stamp + 2 + SEC_WIDTH, USEC_WIDTH, &usec))
        return 0;
    if (!(stamp[0] == ' ' && right_aligned(stamp + 1, SEC_WIDTH, &sec))) {
        const char *dot = stamp + 1 + SEC_WIDTH;
        int k = 0;
        while (k < WIDE_SEC_MAX + 1 && is_digit((unsigned char)dot[-1 - k])) k++;
        if (k <= SEC_WIDTH || k > WIDE_SEC_MAX || dot[-1 - k] != ' ') return 0;
        sec = 0;
        for (int j = k; j >= 1; j--) sec = sec * 10 + (dot[-j] - '0');
        if (sec >= MAX_SECONDS) return 0;
    }
    r->ts_ns = sec * NS_PER_S + usec * 1000;

    /* EVENT ": " TEXT; an event with no text (a line ending in ":") is left to polars. */
    const char *tail = line + c + 2;
    Py_ssize_t tail_n = len - c - 2;
    Py_ssize_t name_n = find_colon_blank(tail, tail_n);
    if (name_n <= 0 || name_n > NAME_WINDOW) return 0;
    uint64_t h = HASH_START;
    for (Py_ssize_t k = 0; k < name_n; k++) {
        if (!is_word((unsigned char)tail[k])) return 0;
        h = HASH_STEP(h, tail[k]);
    }
    int32_t ev = dict_find_h(&st->events, tail, name_n, h, 0, 0, 0);
    if (ev < 0) {
        int kind = K_OTHER;
        for (size_t k = 0; k < N_KNOWN; k++)
            if ((Py_ssize_t)strlen(KNOWN[k].name) == name_n &&
                memcmp(KNOWN[k].name, tail, (size_t)name_n) == 0)
                kind = KNOWN[k].kind;
        if (kind == K_OTHER && dict_find(&st->refused, tail, name_n, 0, 0, 0) >= 0)
            kind = K_REFUSE;
        ev = dict_find_h(&st->events, tail, name_n, h, 1, kind, DICT_MAX);
        if (ev < 0) return 0;
    }
    r->event = (uint32_t)ev;

    /* The text, without the blanks around it (polars' strip_chars). */
    const char *p = tail + name_n + 2;
    Py_ssize_t n = tail_n - name_n - 2;
    while (n > 0 && p[0] == ' ') p++, n--;
    while (n > 0 && p[n - 1] == ' ') n--;
    r->raw = p;
    r->raw_n = n;

    switch ((enum kind)st->events.e[ev].kind) {
    case K_OTHER:
        r->valid |= V_RAW;
        return 1;
    case K_REFUSE:
        return 0;
    case K_EXIT:
        return p_exit(st, p, n, r);
    case K_ENTRY:
        return p_entry(p, n, r);
    case K_PIO:
        return p_pio(p, n, r);
    case K_MMIO:
        return p_mmio(p, n, r);
    case K_FAST_MMIO:
        return p_fast_mmio(p, n, r);
    case K_USERSPACE_EXIT:
        return p_userspace_exit(st, p, n, r);
    case K_SET_IRQ:
        return p_set_irq(p, n, r);
    case K_MSI_SET_IRQ:
        return p_msi_set_irq(p, n, r);
    case K_INJ_VIRQ:
        return p_inj_virq(p, n, r);
    case K_EMULATE_INSN:
        return p_emulate_insn(p, n, r);
    }
    return 0;
}

/* ---- the pass over the file ----------------------------------------------------------- */

static void note_rest(state *st, const char *line, Py_ssize_t len) {
    for (Py_ssize_t k = 0; k < len; k++) {
        unsigned char ch = (unsigned char)line[k];
        if (ch >= 0x80)
            st->non_ascii = 1;
        else if (ch == '\r')
            st->has_cr = 1;
        else if (ch == 0x1f)
            st->has_unit_sep = 1;
        else if (ch == 0)
            st->has_nul = 1;
    }
}

/* Returns -1 when there are more lines than the buffers hold, -2 for a line of 1 GiB or
 * more (the caller reads such a file with polars). */
static int run(state *st, Py_ssize_t *n_rows, Py_ssize_t *n_rest, Py_ssize_t *n_lines) {
    const char *at = st->base, *end = st->base + st->size;
    Py_ssize_t rows = 0, rest = 0, lineno = 0;
    columns *c = &st->c;
    while (at < end) {
        const char *nl = memchr(at, '\n', (size_t)(end - at));
        const char *le = nl ? nl : end;
        Py_ssize_t len = le - at;
        if (lineno >= st->capacity) return -1;
        if (len >= (1LL << VIEW_SHIFT)) return -2; /* a view could not reach past it */
        lineno++;
        row r;
        memset(&r, 0, sizeof r); /* a column without a value holds 0 under its null */
        if (parse_line(st, at, len, &r)) {
            Py_ssize_t k = rows++;
            uint16_t v = r.valid;
            c->lineno[k] = (uint32_t)lineno;
            c->ts_ns[k] = r.ts_ns;
            c->tid[k] = r.tid;
            c->cpu[k] = r.cpu;
            c->event[k] = r.event;
            c->valid[k] = v;
            c->vcpu[k] = r.vcpu;
            c->reason[k] = r.reason;
            c->reason_name[k] = r.reason_name;
            c->isa[k] = r.isa;
            c->flags[k] = r.flags;
            c->addr[k] = r.addr;
            c->size[k] = r.size;
            c->write[k] = r.write;
            c->value[k] = r.value;
            c->count[k] = r.count;
            c->rip[k] = r.rip;
            if (v & V_RAW)
                put_view(c->raw + 16 * k, st->base, r.raw, r.raw_n);
            else
                memset(c->raw + 16 * k, 0, 16);
        } else {
            Py_ssize_t k = rest++;
            c->rest_lineno[k] = (uint32_t)lineno;
            c->rest_start[k] = at - st->base;
            put_view(c->rest_view + 16 * k, st->base, at, len);
            note_rest(st, at, len);
        }
        at = nl ? nl + 1 : end;
    }
    *n_rows = rows;
    *n_rest = rest;
    *n_lines = lineno;
    return 0;
}

/* ---- Python glue ---------------------------------------------------------------------- */

/* Column buffers, in this order, each with room for `capacity` rows of its item size. */
static const struct {
    const char *name;
    Py_ssize_t itemsize;
    size_t offset;
} OUTPUTS[] = {
#define OUT(field, size) {#field, size, offsetof(columns, field)}
    OUT(lineno, 4), OUT(ts_ns, 8), OUT(tid, 4),    OUT(cpu, 2),         OUT(event, 4),
    OUT(vcpu, 4),   OUT(reason, 8), OUT(reason_name, 4), OUT(isa, 4),   OUT(flags, 8),
    OUT(addr, 8),   OUT(size, 4),  OUT(write, 1),  OUT(value, 8),       OUT(count, 4),
    OUT(rip, 8),    OUT(raw, 16),  OUT(valid, 2),  OUT(rest_lineno, 4), OUT(rest_start, 8),
    OUT(rest_view, 16),
#undef OUT
};
#define N_OUTPUTS (sizeof OUTPUTS / sizeof OUTPUTS[0])

static PyObject *names_list(dict *d, Py_ssize_t from) {
    PyObject *out = PyList_New(d->len - from);
    if (!out) return NULL;
    for (Py_ssize_t k = from; k < d->len; k++) {
        PyObject *b = PyBytes_FromStringAndSize(d->e[k].s, d->e[k].n);
        if (!b) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k - from, b);
    }
    return out;
}

/* Borrowed bytes of a bytes object (the lookup table's strings), or NULL with an error. */
static int bytes_of(PyObject *o, const char **s, Py_ssize_t *n) {
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return -1;
    }
    *s = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

PyDoc_STRVAR(parse_doc,
             "parse(data, outputs, reasons, refused) -> (rows, rest, lines, events, names, flags)\n\n"
             "Read the tracefs event lines of `data` (bytes) into the buffers of `outputs`\n"
             "(see vtrace/ingest/native.py). `reasons`: kvm_exit reason texts, a list of\n"
             "(key, reason|None, flags|None, reason_name|None, isa|None), strings as bytes.\n"
             "`refused`: event names whose text this parser must not read (bytes).");

static PyObject *parse(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data_obj, *outputs, *reasons, *refused;
    if (!PyArg_ParseTuple(args, "OO!O!O!", &data_obj, &PyTuple_Type, &outputs, &PyList_Type,
                          &reasons, &PyList_Type, &refused))
        return NULL;
    if (PyTuple_GET_SIZE(outputs) != (Py_ssize_t)N_OUTPUTS) {
        PyErr_Format(PyExc_ValueError, "expected %d output buffers", (int)N_OUTPUTS);
        return NULL;
    }
    PyObject *result = NULL;
    Py_buffer data = {0};
    Py_buffer bufs[N_OUTPUTS];
    size_t held = 0;
    state st;
    memset(&st, 0, sizeof st);
    int dicts = 0;

    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0) return NULL;
    st.base = data.buf;
    st.size = data.len;
    st.capacity = -1;
    for (; held < N_OUTPUTS; held++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(outputs, held), &bufs[held],
                               PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        Py_ssize_t rows = bufs[held].len / OUTPUTS[held].itemsize;
        if (st.capacity < 0 || rows < st.capacity) st.capacity = rows;
        *(void **)((char *)&st.c + OUTPUTS[held].offset) = bufs[held].buf;
    }
    if (st.capacity > UINT32_MAX) st.capacity = UINT32_MAX;

    if (dict_init(&st.events) < 0 || dict_init(&st.names) < 0 || dict_init(&st.reasons) < 0 ||
        dict_init(&st.refused) < 0) {
        PyErr_NoMemory();
        dicts = 1;
        goto done;
    }
    dicts = 1;
    Py_ssize_t n_reasons = PyList_GET_SIZE(reasons);
    if (n_reasons > DICT_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "too many exit reasons");
        goto done;
    }
    st.reason_rows = calloc((size_t)(n_reasons + 1), sizeof(exit_reason));
    if (!st.reason_rows) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n_reasons; k++) {
        PyObject *t = PyList_GET_ITEM(reasons, k);
        const char *s;
        Py_ssize_t n;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
            PyErr_SetString(PyExc_TypeError, "reasons: expected 5-tuples");
            goto done;
        }
        if (bytes_of(PyTuple_GET_ITEM(t, 0), &s, &n) < 0) goto done;
        int32_t at = dict_find(&st.reasons, s, n, 0, 0, 0);
        if (at >= 0) continue; /* the first row of a key wins, like the table's own */
        at = dict_find(&st.reasons, s, n, 1, 0, DICT_MAX);
        exit_reason *x = &st.reason_rows[at];
        PyObject *v;
        v = PyTuple_GET_ITEM(t, 1);
        if ((x->has_reason = v != Py_None) && (x->reason = PyLong_AsLongLong(v), PyErr_Occurred()))
            goto done;
        v = PyTuple_GET_ITEM(t, 2);
        if ((x->has_flags = v != Py_None) && (x->flags = PyLong_AsLongLong(v), PyErr_Occurred()))
            goto done;
        for (int f = 0; f < 2; f++) {
            v = PyTuple_GET_ITEM(t, 3 + f);
            int32_t code = -1;
            if (v != Py_None) {
                if (bytes_of(v, &s, &n) < 0) goto done;
                code = dict_find(&st.names, s, n, 1, 0, DICT_MAX);
            }
            if (f == 0)
                x->name = code;
            else
                x->isa = code;
        }
    }
    st.fixed_names = (int32_t)st.names.len;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(refused); k++) {
        const char *s;
        Py_ssize_t n;
        if (bytes_of(PyList_GET_ITEM(refused, k), &s, &n) < 0) goto done;
        if (dict_find(&st.refused, s, n, 1, 0, DICT_MAX) < 0) {
            PyErr_SetString(PyExc_ValueError, "too many refused event names");
            goto done;
        }
    }

    Py_ssize_t n_rows = 0, n_rest = 0, n_lines = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run(&st, &n_rows, &n_rest, &n_lines);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "more lines than the output buffers hold");
        goto done;
    }
    PyObject *events = names_list(&st.events, 0);
    PyObject *names = events ? names_list(&st.names, 0) : NULL;
    if (!names) {
        Py_XDECREF(events);
        goto done;
    }
    result = Py_BuildValue("(nnnNN{s:i,s:i,s:i,s:i})", n_rows, n_rest, n_lines, events, names,
                           "cr", st.has_cr, "unit_separator", st.has_unit_sep, "nul",
                           st.has_nul, "non_ascii", st.non_ascii);
done:
    for (size_t k = 0; k < held; k++) PyBuffer_Release(&bufs[k]);
    PyBuffer_Release(&data);
    if (dicts) {
        dict_free(&st.events);
        dict_free(&st.names);
        dict_free(&st.reasons);
        dict_free(&st.refused);
    }
    free(st.reason_rows);
    return result;
}

PyDoc_STRVAR(count_lines_doc, "count_lines(data) -> number of lines (newlines, plus a last line without one)");

static PyObject *count_lines(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *s = data.buf;
    Py_ssize_t n = data.len, lines = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Counted in blocks of bytes the compiler vectorises. */
    Py_ssize_t k = 0;
    for (; k + 255 <= n; k += 255) {
        unsigned char block = 0;
        for (int j = 0; j < 255; j++) block += s[k + j] == '\n';
        lines += block;
    }
    for (; k < n; k++) lines += s[k] == '\n';
    if (n > 0 && s[n - 1] != '\n') lines++;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(lines);
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS, parse_doc},
    {"count_lines", count_lines, METH_O, count_lines_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *m) {
    if (PyModule_AddIntConstant(m, "ABI", TRACEFS_ABI) < 0) return -1;
    if (PyModule_AddIntConstant(m, "VIEW_SHIFT", VIEW_SHIFT) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tracefs", "Compiled reader of tracefs event lines.", 0, methods,
    slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tracefs(void) { return PyModuleDef_Init(&module); }
