#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t float_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7fc0 : rounded;
}

static void adam_span(float *restrict w, float *restrict m, float *restrict v, const uint16_t *restrict g,
                      uint16_t *restrict out, int64_t n, float one_minus_b1, float b2, float one_minus_b2,
                      float eps, float l2, float keep, float step_size, float inv_bc2_sqrt) {
    #pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
        float wk = w[k] * keep;
        float gk = bf16_to_float(g[k]) + l2 * wk;
        float mk = m[k] + one_minus_b1 * (gk - m[k]);
        float vk = b2 * v[k] + one_minus_b2 * gk * gk;
        m[k] = mk;
        v[k] = vk;
        wk = wk - step_size * mk / (sqrtf(vk) * inv_bc2_sqrt + eps);
        w[k] = wk;
        out[k] = float_to_bf16(wk);
    }
}

/* One optimizer step over `count` tensors. steps[i] (torch's float32 step counter) is incremented here.
   decoupled != 0: AdamW (weights shrink by lr * weight_decay); else Adam (weight_decay added to the gradient). */
void adam_bf16_master(int64_t count, float **w, float **m, float **v, const uint16_t **g, uint16_t **out,
                      const int64_t *numel, float **steps, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int decoupled) {
    const int64_t chunk = 1 << 14;
    for (int64_t i = 0; i < count; ++i) {
        double step = (double)(*steps[i] += 1.0f);
        double bc1 = 1.0 - pow(beta1, step);
        float step_size = (float)(lr / bc1);
        float inv_bc2_sqrt = (float)(1.0 / sqrt(1.0 - pow(beta2, step)));
        float l2 = decoupled ? 0.0f : (float)weight_decay;
        float keep = decoupled ? (float)(1.0 - lr * weight_decay) : 1.0f;
        int64_t n = numel[i], chunks = (n + chunk - 1) / chunk;
        #pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * chunk, len = n - begin < chunk ? n - begin : chunk;
            adam_span(w[i] + begin, m[i] + begin, v[i] + begin, g[i] + begin, out[i] + begin, len,
                      (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2), (float)eps, l2, keep,
                      step_size, inv_bc2_sqrt);
        }
    }
}

/* SGD (dampening 0) on fp32 masters from bf16 gradients, writing the bf16 weights: torch's foreach SGD operation
   for operation (weight decay and Nesterov's term as fused multiply-adds, as torch's vectorised add with alpha;
   the momentum product rounded before the gradient is added, as torch's mul_ then add_; the file is compiled
   with -ffp-contract=off so that no other product is fused), so the results are torch's bit for bit. first[i]:
   the tensor has no momentum buffer yet, which then starts as the gradient (torch's clone). */
static void sgd_span(float *restrict w, float *restrict buf, const uint16_t *restrict g, uint16_t *restrict out,
                     int64_t n, float weight_decay, float momentum, float neg_lr, int nesterov, int first) {
    #pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
        float gk = bf16_to_float(g[k]);
        if (weight_decay != 0.0f) gk = fmaf(w[k], weight_decay, gk);
        if (momentum != 0.0f) {
            float bk = first ? gk : buf[k] * momentum + gk;
            buf[k] = bk;
            gk = nesterov ? fmaf(bk, momentum, gk) : bk;
        }
        float wk = fmaf(gk, neg_lr, w[k]);
        w[k] = wk;
        out[k] = float_to_bf16(wk);
    }
}

void sgd_bf16_master(int64_t count, float **w, float **buf, const uint16_t **g, uint16_t **out,
                     const int64_t *numel, const int32_t *first, double lr, double momentum, double weight_decay,
                     int nesterov) {
    const int64_t chunk = 1 << 14;
    for (int64_t i = 0; i < count; ++i) {
        int64_t n = numel[i], chunks = (n + chunk - 1) / chunk;
        #pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * chunk, len = n - begin < chunk ? n - begin : chunk;
            sgd_span(w[i] + begin, momentum != 0.0 ? buf[i] + begin : 0, g[i] + begin, out[i] + begin, len,
                     (float)weight_decay, (float)momentum, (float)(-lr), nesterov, first[i]);
        }
    }
}
