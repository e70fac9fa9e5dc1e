/* vizapp: the softmax of attention scores row by row on the CPU, with the entropy and the mean distance of each row
 * taken in the same pass (vizapp/cpu_rows.py builds and calls this file; see its docstring).
 *
 * A row of n scores s (query i of matrix m of a chunk) is read once into the cache, then, while it stays there:
 *   mx = max_j s_j, e_j = exp(s_j - mx), l = sum_j e_j, T = sum_j e_j (mx - s_j) (every term >= 0);
 *   a_j = e_j / l is written out (the attention the caller multiplies by v);
 *   entropy = -sum_j a_j log a_j = T / l + log l;
 *   mean distance (patch queries i >= p): sum_{j >= p} a_ij d_ij / sum_{j >= p} a_ij over the patch keys;
 *   the heads' sum (optional): row i of the image's sum over its heads of a, written or added to.
 * One worker takes every head of a query row, so that its sum is built in the cache by one thread.
 * A key whose score is -inf (a mask) gets weight 0 and adds nothing to T; a row whose every score is -inf is NaN, as
 * torch's softmax of it. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define VZ_MAX_THREADS 256

/* exp(x) for x <= 0 to about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor-like minimax
 * polynomial (Cephes expf's coefficients), times 2^n built in the exponent bits. 0 below -87.3 (where 2^n would leave
 * the normal floats) and for -inf; NaN stays NaN. Written as plain arithmetic so that the row loops vectorise. */
static inline float vz_exp(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    float n = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.3f ? 0.0f : poly * two_n;
}

typedef struct {
    float *out;     /* row value of query q of image b, head h at out + b * s_image + h * s_head + (q - first) * s_query */
    long s_image, s_head, s_query, first;
} vz_target;

typedef struct {
    const float *scores;
    float *probs;
    long rows, n, row0, prefix, per_image;
    const float *dist; /* [n - prefix, n - prefix], row-major */
    vz_target entropy, distance;
    float *head_sum; /* row r of image b of the chunk at head_sum + b * hs_image + r * hs_row (unit last stride) */
    long hs_image, hs_row;
    int hs_add; /* add to what the head sum's rows hold (else the chunk's first head writes them) */
    long lo, hi; /* this worker's (image, query row, head) triples of the chunk, the head fastest */
} vz_job;

static void vz_run(const vz_job *job) {
    const long n = job->n, p = job->prefix, np = n - p, per_image = job->per_image;
    for (long t = job->lo; t < job->hi; t++) {
        const long image = t / (job->rows * per_image), within = t % (job->rows * per_image);
        const long local = within / per_image, head = within % per_image, query = job->row0 + local;
        const long at = (image * per_image + head) * job->rows + local; /* the row's index in scores and probs */
        const float *s = job->scores + at * n;
        float *a = job->probs + at * n;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (long j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        float l = 0.0f, tt = 0.0f;
#pragma omp simd reduction(+ : l, tt)
        for (long j = 0; j < n; j++) {
            const float d = s[j] - mx;
            const float e = vz_exp(d);
            a[j] = e;
            l += e;
            tt += e > 0.0f ? -e * d : 0.0f;
        }
        const float inv = 1.0f / l;
#pragma omp simd
        for (long j = 0; j < n; j++) a[j] *= inv;
        const vz_target *en = &job->entropy;
        if (en->out && query >= en->first)
            en->out[image * en->s_image + head * en->s_head + (query - en->first) * en->s_query] = tt * inv + logf(l);
        const vz_target *di = &job->distance;
        if (di->out && query >= p && query >= di->first) {
            const float *dr = job->dist + (query - p) * np;
            const float *ap = a + p;
            float num = 0.0f, den = 0.0f;
#pragma omp simd reduction(+ : num, den)
            for (long j = 0; j < np; j++) {
                num += ap[j] * dr[j];
                den += ap[j];
            }
            di->out[image * di->s_image + head * di->s_head + (query - di->first) * di->s_query] =
                num / (den > 1.17549435e-38f ? den : 1.17549435e-38f);
        }
        if (job->head_sum) {
            float *hs = job->head_sum + image * job->hs_image + local * job->hs_row;
            if (head == 0 && !job->hs_add) {
#pragma omp simd
                for (long j = 0; j < n; j++) hs[j] = a[j];
            } else {
#pragma omp simd
                for (long j = 0; j < n; j++) hs[j] += a[j];
            }
        }
    }
}

#ifndef _OPENMP
static void *vz_thread(void *arg) {
    vz_run((const vz_job *)arg);
    return NULL;
}
#endif

/* The softmax of scores [mats, rows, n] (contiguous; rows row0 .. row0 + rows of their matrices; matrix m is head
 * m % per_image of image m / per_image of the chunk) into probs (same layout), with each row's entropy and mean
 * distance into their targets and the heads' sum into head_sum (a NULL target: not taken), split over `threads`
 * threads by query rows. Returns the threads used. */
int vz_softmax_rows(const float *scores, float *probs, long mats, long rows, long n, long row0, long prefix,
                    long per_image, const float *dist, float *ent, long ent_si, long ent_sh, long ent_sq,
                    long ent_first, float *dis, long dis_si, long dis_sh, long dis_sq, long dis_first,
                    float *head_sum, long hs_image, long hs_row, int hs_add, int threads) {
    if (per_image <= 0 || mats % per_image) return -1;
    const long queries = mats / per_image * rows; /* (image, query row) pairs: a worker takes whole ones */
    if (queries <= 0) return 0;
    if (threads > VZ_MAX_THREADS) threads = VZ_MAX_THREADS;
    if (threads > queries) threads = (int)queries;
    if (threads < 1) threads = 1;
    vz_job jobs[VZ_MAX_THREADS];
    for (int w = 0; w < threads; w++) {
        vz_job job = {scores, probs, rows, n, row0, prefix, per_image, dist,
                      {ent, ent_si, ent_sh, ent_sq, ent_first}, {dis, dis_si, dis_sh, dis_sq, dis_first},
                      head_sum, hs_image, hs_row, hs_add,
                      queries * w / threads * per_image, queries * (w + 1) / threads * per_image};
        jobs[w] = job;
    }
#ifdef _OPENMP
    /* OpenMP's threads: in a process with torch they are torch's own (its libgomp, already loaded, serves this
     * library's calls too), warm and waiting, where a thread of our own would have to wait for one of them to stop
     * spinning after torch's last parallel operation */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int w = 0; w < threads; w++) vz_run(&jobs[w]);
#else
    pthread_t ids[VZ_MAX_THREADS];
    int started = 0; /* workers 1 .. started run in their own threads; the rest here, after worker 0 */
    while (started + 1 < threads && pthread_create(&ids[started + 1], NULL, vz_thread, &jobs[started + 1]) == 0)
        started++;
    vz_run(&jobs[0]);
    for (int w = started + 1; w < threads; w++) vz_run(&jobs[w]);
    for (int w = 1; w <= started; w++) pthread_join(ids[w], NULL);
#endif
    return threads;
}
