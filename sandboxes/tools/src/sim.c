/* simulate: the deterministic "training run" of klongd's built-in task
 * family ("reproduce a small paper").  It stands in for an experiment: it
 * takes a configuration, prints a short training log and a final metric.
 *
 *   simulate --model NAME --lr RATE --steps N --seed S [--metric NAME]
 *
 *   NAME    mlp | cnn | rnn | transformer
 *   RATE    a plain decimal in (0, 1] with at most 6 decimals ("0.003")
 *   N       training steps, 1..1000000
 *   S       seed, 0..4294967295
 *   metric  accuracy (default) | f1 | auroc | recall
 *
 * Output (stdout), e.g.:
 *   simulate: model=cnn lr=0.003 steps=200 seed=7 metric=f1
 *   step 50/200 loss=1.2345
 *   ... (four progress lines)
 *   f1=0.8123
 *
 * Invalid or missing parameters: a message on stderr and exit status 2.
 *
 * Everything is integer arithmetic (the rate is parsed into millionths), so
 * the wasm and native builds, and the Rust port in klong-actors
 * (actors/src/environment/family.rs, `simulate_metric`) that writes the
 * rubric's expected values, agree to the last digit.  Change one, change
 * both: a test checks them against each other. */
#include "common.h"

static const char *const USAGE =
    "--model mlp|cnn|rnn|transformer --lr RATE --steps N --seed S [--metric accuracy|f1|auroc|recall]";

static const struct {
    const char *name;
    int64_t base;   /* metric at the best rate and many steps, in 1/10000 */
    int64_t opt_lr; /* best learning rate, in millionths */
} MODELS[] = {
    {"mlp", 7200, 3000},
    {"cnn", 8100, 1000},
    {"rnn", 7600, 2000},
    {"transformer", 8700, 300},
};

static const struct {
    const char *name;
    int64_t offset; /* in 1/10000 */
} METRICS[] = {
    {"accuracy", 0},
    {"f1", -250},
    {"auroc", 150},
    {"recall", -100},
};

#define NELEMS(a) (sizeof(a) / sizeof((a)[0]))

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xCBF29CE484222325ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001B3ULL;
    }
    return h;
}

/* "0.003" -> 3000 millionths.  Plain decimals only: digits, an optional
 * point and at most 6 decimals; the value must be in (0, 1]. */
static bool parse_rate(const char *s, int64_t *out)
{
    int64_t whole = 0, frac = 0;
    int ndigits = 0, nfrac = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (++ndigits > 7)
            return false;
        whole = whole * 10 + (*p - '0');
    }
    if (*p == '.') {
        for (p++; *p >= '0' && *p <= '9'; p++) {
            if (++nfrac > 6)
                return false;
            frac = frac * 10 + (*p - '0');
        }
    }
    if (*p != '\0' || ndigits + nfrac == 0)
        return false;
    for (int i = nfrac; i < 6; i++)
        frac *= 10;
    int64_t v = whole * 1000000 + frac;
    if (v <= 0 || v > 1000000)
        return false;
    *out = v;
    return true;
}

/* Digits only (no sign, no spaces), at most MAX. */
static bool parse_bounded(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    if (!*s)
        return false;
    uint64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > max)
            return false;
    }
    if (v < min)
        return false;
    *out = v;
    return true;
}

int tool_simulate(int argc, char **argv)
{
    const char *model = NULL, *lr_s = NULL, *steps_s = NULL, *seed_s = NULL, *metric = "accuracy";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = NULL;
        if (strcmp(a, "--model") == 0)
            slot = &model;
        else if (strcmp(a, "--lr") == 0)
            slot = &lr_s;
        else if (strcmp(a, "--steps") == 0)
            slot = &steps_s;
        else if (strcmp(a, "--seed") == 0)
            slot = &seed_s;
        else if (strcmp(a, "--metric") == 0)
            slot = &metric;
        else
            return usage_error(USAGE, "unknown argument '%s'", a);
        if (i + 1 >= argc)
            return usage_error(USAGE, "%s needs a value", a);
        *slot = argv[++i];
    }
    if (!model || !lr_s || !steps_s || !seed_s)
        return usage_error(USAGE, "--model, --lr, --steps and --seed are required");

    size_t mi = NELEMS(MODELS), ki = NELEMS(METRICS);
    for (size_t i = 0; i < NELEMS(MODELS); i++)
        if (strcmp(model, MODELS[i].name) == 0)
            mi = i;
    if (mi == NELEMS(MODELS))
        return usage_error(USAGE, "unknown model '%s'", model);
    for (size_t i = 0; i < NELEMS(METRICS); i++)
        if (strcmp(metric, METRICS[i].name) == 0)
            ki = i;
    if (ki == NELEMS(METRICS))
        return usage_error(USAGE, "unknown metric '%s'", metric);
    int64_t lr;
    if (!parse_rate(lr_s, &lr))
        return usage_error(USAGE, "invalid --lr '%s': a decimal in (0, 1] with at most 6 decimals", lr_s);
    uint64_t steps, seed;
    if (!parse_bounded(steps_s, 1, 1000000, &steps))
        return usage_error(USAGE, "invalid --steps '%s': an integer from 1 to 1000000", steps_s);
    if (!parse_bounded(seed_s, 0, 4294967295ULL, &seed))
        return usage_error(USAGE, "invalid --seed '%s': an integer from 0 to 4294967295", seed_s);

    /* The metric, in 1/10000: the model's ceiling, minus a penalty for the
     * rate's distance from the model's best rate (relative, 0..2000), minus
     * a penalty for too few steps (saturating), plus seeded noise. */
    int64_t opt = MODELS[mi].opt_lr;
    int64_t dist = (lr > opt ? lr - opt : opt - lr) * 1000 / (lr + opt);
    int64_t sat = (int64_t)steps * 1000 / ((int64_t)steps + 300);
    uint64_t h = splitmix64(fnv1a(model) ^ splitmix64((uint64_t)lr) ^ splitmix64(steps << 20) ^
                            splitmix64(seed << 40) ^ fnv1a(metric));
    int64_t noise = (int64_t)(h % 601) - 300;
    int64_t value = MODELS[mi].base + METRICS[ki].offset - 2 * dist - (1000 - sat) + noise;
    if (value < 0)
        value = 0;
    if (value > 9999)
        value = 9999;

    printf("simulate: model=%s lr=%s steps=%llu seed=%llu metric=%s\n", model, lr_s,
           (unsigned long long)steps, (unsigned long long)seed, metric);
    /* A falling loss curve ending near (1 - metric): decoration for the log. */
    for (uint64_t q = 1; q <= 4; q++) {
        uint64_t at = (steps * q + 3) / 4;
        uint64_t loss = 23026 * (4 - q) / 4 + (uint64_t)(10000 - value) * 2 / 3 + (h >> (8 * q)) % 97;
        printf("step %llu/%llu loss=%llu.%04llu\n", (unsigned long long)at, (unsigned long long)steps,
               (unsigned long long)(loss / 10000), (unsigned long long)(loss % 10000));
    }
    printf("%s=0.%04lld\n", metric, (long long)value);
    return EXIT_OK;
}
