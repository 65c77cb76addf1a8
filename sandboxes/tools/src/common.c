/* Helpers shared by all tools: messages, memory, input, options, paths. */
#include "common.h"

#include <ctype.h>
#include <dirent.h>
#include <stdarg.h>
#include <unistd.h>

const char *g_prog = "coreutils";

/* ---- messages ------------------------------------------------------- */

void err_path(const char *path, int errnum)
{
    fflush(stdout); /* keep stdout/stderr roughly in order when both are a tty */
    fprintf(stderr, "%s: %s: %s\n", g_prog, path, strerror(errnum));
}

void err_msg(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", g_prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int usage_error(const char *usage, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    if (fmt) {
        fprintf(stderr, "%s: ", g_prog);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
    }
    fprintf(stderr, "usage: %s %s\n", g_prog, usage);
    return EXIT_USAGE;
}

/* ---- memory --------------------------------------------------------- */

static void out_of_memory(void)
{
    fflush(stdout);
    fprintf(stderr, "%s: out of memory\n", g_prog);
    exit(EXIT_ERR);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        out_of_memory();
    return p;
}

void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        out_of_memory();
    return p;
}

char *xmemdup(const void *p, size_t n)
{
    char *q = xmalloc(n + 1);
    memcpy(q, p, n);
    q[n] = '\0';
    return q;
}

char *xstrdup(const char *s) { return xmemdup(s, strlen(s)); }

void buf_reserve(buf_t *b, size_t extra)
{
    if (extra > SIZE_MAX - b->len - 1)
        out_of_memory();
    if (b->len + extra + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + extra + 1)
            cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
}

void buf_append(buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0'; /* always NUL-terminated for convenience */
}

void buf_putc(buf_t *b, char c) { buf_append(b, &c, 1); }

void buf_free(buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ---- input ---------------------------------------------------------- */

FILE *open_input(const char *path)
{
    if (strcmp(path, "-") == 0)
        return stdin;
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_path(path, errno);
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        err_path(path, EISDIR);
        return NULL;
    }
    return f;
}

void close_input(FILE *f)
{
    if (f && f != stdin)
        fclose(f);
    else if (f == stdin)
        clearerr(stdin); /* "cat - -": a second read of stdin sees EOF */
}

int read_stream(FILE *f, buf_t *b)
{
    for (;;) {
        buf_reserve(b, 65536);
        size_t n = fread(b->data + b->len, 1, b->cap - b->len - 1, f);
        b->len += n;
        b->data[b->len] = '\0';
        if (n == 0) {
            if (ferror(f))
                return errno ? errno : EIO;
            return 0;
        }
    }
}

ptrdiff_t read_line(FILE *f, char **line, size_t *cap)
{
    errno = 0;
    ssize_t n = getline(line, cap, f);
    if (n < 0) {
        if (errno == ENOMEM)
            out_of_memory();
        return -1;
    }
    return (ptrdiff_t)n;
}

/* ---- output --------------------------------------------------------- */

void out_write(const void *p, size_t n)
{
    if (n)
        fwrite(p, 1, n, stdout);
}

int finish_output(int status)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        int e = errno ? errno : EIO;
        fprintf(stderr, "%s: write error: %s\n", g_prog, strerror(e));
        return EXIT_ERR;
    }
    return status;
}

/* ---- options -------------------------------------------------------- */

void opts_init(opts_t *o, int argc, char **argv, const char *spec, bool permute)
{
    memset(o, 0, sizeof *o);
    o->argc = argc;
    o->argv = argv;
    o->spec = spec;
    o->permute = permute;
    o->idx = 1;
    o->operands = xmalloc(sizeof(char *) * (size_t)(argc + 1));
}

int opts_next(opts_t *o)
{
    o->arg = NULL;
    for (;;) {
        if (o->pos && *o->pos) {
            char c = *o->pos++;
            if (c == '#' || (isdigit((unsigned char)c) && strchr(o->spec, '#'))) {
                /* "-5" style count: the digits are the whole rest */
                if (c == '#' || o->pos - 1 != o->argv[o->idx - 1] + 1)
                    goto unknown;
                o->arg = o->pos - 1;
                o->pos = NULL;
                return '#';
            }
            const char *s = c != ':' ? strchr(o->spec, c) : NULL;
            if (!s) {
            unknown:
                err_msg("invalid option -- '%c'", c);
                return '?';
            }
            if (s[1] == ':') {
                if (*o->pos) {
                    o->arg = o->pos;
                } else if (o->idx < o->argc) {
                    o->arg = o->argv[o->idx++];
                } else {
                    err_msg("option requires an argument -- '%c'", c);
                    return '?';
                }
                o->pos = NULL;
            }
            return c;
        }
        o->pos = NULL;
        if (o->idx >= o->argc) {
            o->operands[o->noperands] = NULL;
            return 0;
        }
        char *a = o->argv[o->idx++];
        if (o->only_operands || a[0] != '-' || a[1] == '\0') {
            o->operands[o->noperands++] = a; /* "-" alone is an operand (stdin) */
            if (!o->permute)
                o->only_operands = true;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            o->only_operands = true;
            continue;
        }
        if (a[1] == '-') {
            err_msg("unrecognized option '%s'", a);
            return '?';
        }
        o->pos = a + 1;
    }
}

/* ---- numbers -------------------------------------------------------- */

bool parse_count(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (!s || !*s)
        return false;
    if (*s == '+')
        s++;
    if (!isdigit((unsigned char)*s))
        return false;
    for (; *s; s++) {
        if (!isdigit((unsigned char)*s))
            return false;
        unsigned d = (unsigned)(*s - '0');
        v = v > (UINT64_MAX - d) / 10 ? UINT64_MAX : v * 10 + d;
    }
    *out = v;
    return true;
}

/* ---- paths ---------------------------------------------------------- */

char *path_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    while (dl > 1 && dir[dl - 1] == '/')
        dl--;
    bool slash = !(dl == 1 && dir[0] == '/');
    char *p = xmalloc(dl + nl + 2);
    memcpy(p, dir, dl);
    if (slash)
        p[dl++] = '/';
    memcpy(p + dl, name, nl + 1);
    return p;
}

const char *base_name(const char *path)
{
    const char *end = path + strlen(path);
    while (end > path + 1 && end[-1] == '/')
        end--;
    const char *b = end;
    while (b > path && b[-1] != '/')
        b--;
    return b; /* may keep trailing slashes; callers only compare prefixes */
}

char *strip_slashes(const char *path)
{
    char *p = xstrdup(path);
    for (size_t n = strlen(p); n > 1 && p[n - 1] == '/'; n--)
        p[n - 1] = '\0';
    return p;
}

/* Creates PATH's prefixes up to (but excluding) byte LIMIT, then maybe
 * PATH itself.  Existing directories are fine; anything else fails. */
static int mkdir_prefixes(const char *path, size_t limit, char **failed)
{
    char *p = xstrdup(path);
    for (size_t i = 1; i <= limit; i++) {
        if (i < limit && p[i] != '/')
            continue;
        char saved = p[i];
        p[i] = '\0';
        if (p[i - 1] != '/' && strcmp(p, ".") != 0 && mkdir(p, 0777) != 0) {
            int e = errno;
            struct stat st;
            if (!(e == EEXIST && stat(p, &st) == 0 && S_ISDIR(st.st_mode))) {
                if (e == EEXIST)
                    e = ENOTDIR;
                *failed = p;
                return e;
            }
        }
        p[i] = saved;
    }
    free(p);
    return 0;
}

int make_parents(const char *path, char **failed)
{
    size_t n = strlen(path);
    while (n > 0 && path[n - 1] == '/')
        n--;
    while (n > 0 && path[n - 1] != '/')
        n--;
    while (n > 0 && path[n - 1] == '/')
        n--;
    if (n == 0)
        return 0;
    return mkdir_prefixes(path, n, failed);
}

int make_dirs(const char *path, char **failed)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    return mkdir_prefixes(path, n, failed);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

char **list_dir(const char *path, size_t *n)
{
    DIR *d = opendir(path);
    if (!d)
        return NULL;
    size_t cap = 16, cnt = 0;
    char **names = xmalloc(cap * sizeof *names);
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (cnt == cap)
            names = xrealloc(names, (cap *= 2) * sizeof *names);
        names[cnt++] = xstrdup(de->d_name);
        errno = 0;
    }
    int e = errno;
    closedir(d);
    if (e) {
        free_names(names, cnt);
        errno = e;
        return NULL;
    }
    qsort(names, cnt, sizeof *names, cmp_names);
    *n = cnt;
    return names;
}

void free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

bool looks_binary(const char *p, size_t n)
{
    return memchr(p, '\0', n < 8192 ? n : 8192) != NULL;
}

const char *find_bytes(const char *hay, size_t hlen, const char *needle, size_t nlen, bool icase)
{
    if (nlen == 0)
        return hay;
    if (nlen > hlen)
        return NULL;
    unsigned char first = (unsigned char)needle[0];
    for (size_t i = 0; i + nlen <= hlen; i++) {
        if (!icase) {
            /* memchr is fast; jump to the next candidate first byte */
            const char *c = memchr(hay + i, first, hlen - nlen - i + 1);
            if (!c)
                return NULL;
            i = (size_t)(c - hay);
            if (memcmp(c, needle, nlen) == 0)
                return c;
        } else {
            size_t j = 0;
            while (j < nlen && tolower((unsigned char)hay[i + j]) == tolower((unsigned char)needle[j]))
                j++;
            if (j == nlen)
                return hay + i;
        }
    }
    return NULL;
}
