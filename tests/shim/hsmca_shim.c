/*
 * hsmca_shim: a fault-injecting PKCS#11 module for drills and tests.
 *
 * It loads the real module named by HSMCA_SHIM_MODULE (SoftHSM2 in the tests), hands out a copy
 * of that module's function table, and replaces three entries so a test can make the token
 * misbehave the way a failing HSM, a pulled USB token or a dying battery does:
 *
 *   HSMCA_SHIM_RNG=zero             C_GenerateRandom returns all-zero bytes
 *   HSMCA_SHIM_RNG=stuck            C_GenerateRandom returns the same bytes on every call
 *   HSMCA_SHIM_RNG=fail:CKR_NAME    C_GenerateRandom returns that code
 *   HSMCA_SHIM_SIGN=fail:CKR_NAME   C_Sign returns that code (the real operation is finished)
 *   HSMCA_SHIM_SIGN=corrupt         C_Sign returns the real signature with one bit flipped
 *   HSMCA_SHIM_SIGN=session-lost    C_Sign returns CKR_SESSION_HANDLE_INVALID
 *   HSMCA_SHIM_SIGN=delay:200ms     C_Sign sleeps that long (ms or s), then signs
 *   HSMCA_SHIM_LOGIN=fail:CKR_NAME  C_Login returns that code
 *
 * HSMCA_SHIM_REPORT=FILE makes C_Login append one line to FILE describing the process at the
 * moment it logs in, for the PIN-hygiene tests (issue 13):
 *   pin_env=absent|present dumpable=0|1 core=SOFT_LIMIT
 *
 * HSMCA_SHIM_AFTER=N lets the first N calls of each faulted function through untouched;
 * HSMCA_SHIM_RNG_AFTER, HSMCA_SHIM_SIGN_AFTER and HSMCA_SHIM_LOGIN_AFTER override it per
 * function. Counts are per process. C_Sign's length query (a NULL signature buffer) is never
 * counted or faulted. CKR_NAME is one of the names in `codes` below or a number (0x30).
 *
 * A setting the shim does not understand, or a real module it cannot load, makes
 * C_GetFunctionList fail with CKR_GENERAL_ERROR after a line on stderr: a drill must never
 * run against a healthy token by mistake.
 *
 * The PKCS#11 types are declared here (v2.40 layout: a CK_VERSION followed by 68 function
 * pointers, C_Login at 18, C_Sign at 43, C_GenerateRandom at 64) so no header is needed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_USER_TYPE;
typedef unsigned char CK_BYTE;

typedef struct {
    CK_BYTE major;
    CK_BYTE minor;
} CK_VERSION;

#define FUNCTIONS 68
#define IDX_LOGIN 18
#define IDX_SIGN 43
#define IDX_RANDOM 64

typedef struct {
    CK_VERSION version;
    void *fn[FUNCTIONS];
} CK_FUNCTION_LIST;

typedef CK_RV (*get_function_list_t)(CK_FUNCTION_LIST **);
typedef CK_RV (*login_t)(CK_SESSION_HANDLE, CK_USER_TYPE, CK_BYTE *, CK_ULONG);
typedef CK_RV (*sign_t)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
typedef CK_RV (*random_t)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);

#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_SESSION_HANDLE_INVALID 0xB3UL

static const struct {
    const char *name;
    CK_RV value;
} codes[] = {
    {"CKR_HOST_MEMORY", 0x2},
    {"CKR_GENERAL_ERROR", 0x5},
    {"CKR_FUNCTION_FAILED", 0x6},
    {"CKR_DEVICE_ERROR", 0x30},
    {"CKR_DEVICE_MEMORY", 0x31},
    {"CKR_DEVICE_REMOVED", 0x32},
    {"CKR_FUNCTION_CANCELED", 0x50},
    {"CKR_KEY_HANDLE_INVALID", 0x60},
    {"CKR_PIN_INCORRECT", 0xA0},
    {"CKR_PIN_LOCKED", 0xA4},
    {"CKR_SESSION_CLOSED", 0xB0},
    {"CKR_SESSION_HANDLE_INVALID", 0xB3},
    {"CKR_TOKEN_NOT_PRESENT", 0xE0},
    {"CKR_USER_NOT_LOGGED_IN", 0x101},
    {"CKR_RANDOM_NO_RNG", 0x121},
};

enum mode { PASS, RNG_ZERO, RNG_STUCK, FAIL, CORRUPT, DELAY };

struct fault {
    enum mode mode;
    CK_RV code;
    long delay_ms;
    unsigned long after;
    unsigned long calls;
};

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST table;
static CK_FUNCTION_LIST *real;
static int broken;
static struct fault rng, sign, login;
static CK_BYTE stuck[32];
static int stuck_set;

static void complain(const char *what, const char *value)
{
    fprintf(stderr, "hsmca_shim: %s: %s\n", what, value ? value : "(unset)");
    broken = 1;
}

static int parse_code(const char *s, CK_RV *out)
{
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        if (strcmp(s, codes[i].name) == 0) {
            *out = codes[i].value;
            return 1;
        }
    }
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    if (*s && *end == '\0') {
        *out = v;
        return 1;
    }
    return 0;
}

static unsigned long parse_after(const char *specific)
{
    const char *s = getenv(specific);
    if (!s || !*s)
        s = getenv("HSMCA_SHIM_AFTER");
    if (!s || !*s)
        return 0;
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (*end != '\0')
        complain("not a number of calls", s);
    return v;
}

/* Parses one HSMCA_SHIM_* setting; `rng_modes` picks the RNG modes over the C_Sign ones. */
static void parse_fault(struct fault *f, const char *var, const char *after_var, int rng_modes)
{
    const char *s = getenv(var);
    f->mode = PASS;
    f->after = parse_after(after_var);
    if (!s || !*s)
        return;
    if (strncmp(s, "fail:", 5) == 0) {
        f->mode = FAIL;
        if (!parse_code(s + 5, &f->code))
            complain("unknown return code", s);
    } else if (rng_modes && strcmp(s, "zero") == 0) {
        f->mode = RNG_ZERO;
    } else if (rng_modes && strcmp(s, "stuck") == 0) {
        f->mode = RNG_STUCK;
    } else if (!rng_modes && strcmp(s, "corrupt") == 0) {
        f->mode = CORRUPT;
    } else if (!rng_modes && strcmp(s, "session-lost") == 0) {
        f->mode = FAIL;
        f->code = CKR_SESSION_HANDLE_INVALID;
    } else if (!rng_modes && strncmp(s, "delay:", 6) == 0) {
        char *end;
        long v = strtol(s + 6, &end, 10);
        f->mode = DELAY;
        if (strcmp(end, "ms") == 0)
            f->delay_ms = v;
        else if (strcmp(end, "s") == 0)
            f->delay_ms = v * 1000;
        else
            complain("a delay is NUMBERms or NUMBERs", s);
    } else {
        complain(var, s);
    }
}

/* Counts a call; returns whether the fault applies to it. */
static int due(struct fault *f)
{
    if (f->mode == PASS)
        return 0;
    pthread_mutex_lock(&lock);
    f->calls++;
    int hit = f->calls > f->after;
    pthread_mutex_unlock(&lock);
    return hit;
}

/* Appends the process's PIN hygiene as seen from inside the module to HSMCA_SHIM_REPORT. */
static void report_login(void)
{
    const char *path = getenv("HSMCA_SHIM_REPORT");
    if (!path || !*path)
        return;
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    struct rlimit core = {0, 0};
    getrlimit(RLIMIT_CORE, &core);
    fprintf(f, "pin_env=%s dumpable=%d core=%llu\n", getenv("HSMCA_PIN") ? "present" : "absent",
            prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), (unsigned long long)core.rlim_cur);
    fclose(f);
}

static CK_RV shim_login(CK_SESSION_HANDLE s, CK_USER_TYPE u, CK_BYTE *pin, CK_ULONG len)
{
    report_login();
    if (due(&login))
        return login.code;
    return ((login_t)real->fn[IDX_LOGIN])(s, u, pin, len);
}

static CK_RV shim_sign(CK_SESSION_HANDLE s, CK_BYTE *data, CK_ULONG data_len, CK_BYTE *sig,
                       CK_ULONG *sig_len)
{
    sign_t next = (sign_t)real->fn[IDX_SIGN];
    if (sig == NULL || !due(&sign))
        return next(s, data, data_len, sig, sig_len);
    if (sign.mode == DELAY) {
        struct timespec ts = {sign.delay_ms / 1000, (sign.delay_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        return next(s, data, data_len, sig, sig_len);
    }
    /* Finish the real operation so the session is not left with an active C_SignInit. */
    CK_RV rv = next(s, data, data_len, sig, sig_len);
    if (sign.mode == FAIL)
        return sign.code;
    if (rv == CKR_OK && *sig_len > 0)
        sig[*sig_len / 2] ^= 0x01;
    return rv;
}

static CK_RV shim_random(CK_SESSION_HANDLE s, CK_BYTE *out, CK_ULONG len)
{
    random_t next = (random_t)real->fn[IDX_RANDOM];
    if (!due(&rng))
        return next(s, out, len);
    switch (rng.mode) {
    case FAIL:
        return rng.code;
    case RNG_ZERO:
        memset(out, 0, len);
        return CKR_OK;
    default:
        pthread_mutex_lock(&lock);
        if (!stuck_set) {
            CK_RV rv = next(s, stuck, sizeof stuck);
            if (rv != CKR_OK) {
                pthread_mutex_unlock(&lock);
                return rv;
            }
            stuck_set = 1;
        }
        for (CK_ULONG i = 0; i < len; i++)
            out[i] = stuck[i % sizeof stuck];
        pthread_mutex_unlock(&lock);
        return CKR_OK;
    }
}

static void setup(void)
{
    const char *path = getenv("HSMCA_SHIM_MODULE");
    if (!path || !*path) {
        complain("HSMCA_SHIM_MODULE must name the real PKCS#11 module", path);
        return;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        complain("cannot load the real module", dlerror());
        return;
    }
    get_function_list_t get = (get_function_list_t)dlsym(h, "C_GetFunctionList");
    if (!get || get(&real) != CKR_OK || !real) {
        complain("the real module has no usable C_GetFunctionList", path);
        return;
    }
    table = *real;
    parse_fault(&rng, "HSMCA_SHIM_RNG", "HSMCA_SHIM_RNG_AFTER", 1);
    parse_fault(&sign, "HSMCA_SHIM_SIGN", "HSMCA_SHIM_SIGN_AFTER", 0);
    parse_fault(&login, "HSMCA_SHIM_LOGIN", "HSMCA_SHIM_LOGIN_AFTER", 0);
    if (login.mode != PASS && login.mode != FAIL)
        complain("HSMCA_SHIM_LOGIN takes only fail:CKR_NAME", getenv("HSMCA_SHIM_LOGIN"));
    table.fn[IDX_LOGIN] = (void *)shim_login;
    table.fn[IDX_SIGN] = (void *)shim_sign;
    table.fn[IDX_RANDOM] = (void *)shim_random;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST **out)
{
    pthread_once(&once, setup);
    if (broken || !out)
        return CKR_GENERAL_ERROR;
    *out = &table;
    return CKR_OK;
}
