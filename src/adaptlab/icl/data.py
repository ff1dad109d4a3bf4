"""Synthetic in-context-learning sequences (Chan et al. 2022; Reddy 2023; Huang et al. 2026), hand-written.

No maintained library generates these bursty Gaussian-cluster sequences, so this follows the official
code (YiranHuangIrene/multimodal-icl) as described in shared/papers/icl.md §1:

* a fixed "world" per run: K class means μ_k ~ N(0, I/D), L label vectors λ_ℓ ~ N(0, I/D), ℓ(k) = k mod L;
* an item is x = (μ_k + ε·η)/√(1+ε²) with fresh noise η ~ N(0, I/D) (so E‖x‖² = 1); label tokens are λ exactly;
* a sequence is [x_1, λ_1, …, x_N, λ_N, x_q] (length 2N+1); the target is ℓ(k_q);
* bursty sequences (prob ``p_bursty``): N/B classes drawn from the Zipf(α) law P(k) ∝ (k+1)^-α, each repeated
  B times, shuffled; the query is the class of a uniformly random context slot. Non-bursty: N i.i.d. classes,
  independent query. B = 0 means "all non-bursty" (the official code's convention);
* novel-class sequences (prob ``p_novel``): the bursty recipe on ``novel_classes`` fresh means, redrawn per call.

Multimodal (§1b): a primary modality M1 (the unimodal world above) and a secondary M2 with K2 classes in D2
dims and L2 ≤ L labels ℓ2(k) = k mod L2, sharing the first L2 label vectors. A context exemplar is a pair
(c1, c2) with ℓ1(c1) = ℓ2(c2); the sequence is [M1_1, M2_1, y_1, …, M1_N, M2_N, y_N, M1_q, M2_q] (3N+2 tokens);
the M2 slots hold zeros here and the raw M2 items travel separately (the model projects them).

Everything is drawn from explicit ``numpy.random.Generator`` objects seeded by (seed, purpose, step): the same
seed gives bit-identical worlds, batches and test sets, and no global RNG is touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# purposes of the independent random streams derived from one seed
_WORLD, _TRAIN, _VAL, _TEST, _WORLD2 = 0, 1, 2, 3, 4


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *map(int, keys)])


def zipf_probs(k: int, alpha: float) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=np.float64) ** (-float(alpha))
    return p / p.sum()


def check_params(K: int, L: int, N: int, B: int, where: str = "icl.data") -> None:
    """Reject bad parameters with a message naming the key (the generator's own invariants)."""
    if L < 1 or K < L or K % L:
        raise ValueError(f"{where}: K={K} must be a positive multiple of L={L} (each label owns K/L classes)")
    if B < 0 or (B > 0 and (N % B or B >= N)):
        raise ValueError(f"{where}: burstiness B={B} must divide the number of context pairs N={N} and be < N "
                         f"(or 0 for non-bursty)")


@dataclass
class Batch:
    """One batch of sequences. ``tokens`` (n, T, D) float32; ``target`` (n,) int64 label of the query;
    ``ctx_labels`` (n, N) labels shown in the context; ``ctx_classes``/``query_class`` the classes behind
    them (novel classes are offset by 10^6 so they never equal a training class); ``pos_offset`` (n,)
    the APE shift; multimodal batches also carry ``m2`` (n, N+1, D2) raw secondary items and the M2 classes."""

    tokens: np.ndarray
    target: np.ndarray
    ctx_labels: np.ndarray
    ctx_classes: np.ndarray
    query_class: np.ndarray
    pos_offset: np.ndarray
    bursty: np.ndarray
    novel: np.ndarray
    m2: np.ndarray | None = None
    ctx_classes2: np.ndarray | None = None
    query_class2: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)


NOVEL_OFFSET = 10 ** 6


class ICLWorld:
    """The unimodal generator: a fixed world of K class means and L label vectors, and its sequence sampler."""

    def __init__(self, K: int, D: int = 64, L: int = 32, N: int = 8, B: int = 2, p_bursty: float = 1.0,
                 p_novel: float = 0.0, eps: float = 0.1, alpha: float = 0.0, novel_classes: int = 128,
                 n_max: int = 32, no_repeats: bool = False, seed: int = 0):
        check_params(K, L, N, B)
        if novel_classes % L:
            raise ValueError(f"icl.data: novel_classes={novel_classes} must be a multiple of L={L}")
        self.K, self.D, self.L, self.N, self.eps, self.alpha = K, D, L, N, eps, alpha
        # B = 0: all non-bursty (the official code sets B = N/2 and p_B = 0)
        self.B, self.p_bursty = (B, p_bursty) if B > 0 else (N // 2, 0.0)
        self.p_novel, self.novel_classes, self.n_max, self.no_repeats, self.seed = p_novel, novel_classes, n_max, no_repeats, seed
        if 2 * N + 1 > 2 * n_max + 1:
            raise ValueError(f"icl.data: N={N} exceeds n_max={n_max} (the APE one-hot block has 2*n_max+1 slots)")
        rng = rng_for(seed, _WORLD)
        self.means = rng.normal(0, 1 / np.sqrt(D), (K, D)).astype(np.float32)
        self.label_vecs = rng.normal(0, 1 / np.sqrt(D), (L, D)).astype(np.float32)
        self.probs = zipf_probs(K, alpha)

    @property
    def seq_len(self) -> int:
        return 2 * self.N + 1

    # -- class sampling --------------------------------------------------------------------------------------
    def _bursty_classes(self, rng, n: int, probs: np.ndarray, B: int):
        """(n, N) context classes made of N/B draws repeated B times and shuffled; query = a random slot's class."""
        n_distinct, K = self.N // B, len(probs)
        if self.no_repeats:
            # Reddy: N/B distinct labels, class = label + L·U(0..K/L-1)
            labels = np.argsort(rng.random((n, self.L)), axis=1)[:, :n_distinct]
            draws = labels + self.L * rng.integers(0, K // self.L, (n, n_distinct))
        else:
            draws = rng.choice(K, size=(n, n_distinct), p=probs)
        ctx = np.repeat(draws, B, axis=1)
        perm = np.argsort(rng.random(ctx.shape), axis=1)
        ctx = np.take_along_axis(ctx, perm, axis=1)
        query = ctx[np.arange(n), rng.integers(0, self.N, n)]
        return ctx, query

    def _iid_classes(self, rng, n: int, probs: np.ndarray):
        K = len(probs)
        return rng.choice(K, size=(n, self.N), p=probs), rng.choice(K, size=n, p=probs)

    def _items(self, rng, means: np.ndarray, classes: np.ndarray) -> np.ndarray:
        noise = rng.normal(0, 1 / np.sqrt(means.shape[1]), classes.shape + (means.shape[1],))
        return ((means[classes] + self.eps * noise) / np.sqrt(1 + self.eps ** 2)).astype(np.float32)

    def sample_classes(self, rng, n: int, p_bursty: float, p_novel: float):
        """Context and query classes plus bursty/novel flags; novel classes index ``novel_means``."""
        bursty = rng.random(n) < p_bursty
        novel = rng.random(n) < p_novel
        ctx, query = self._iid_classes(rng, n, self.probs)
        b_ctx, b_query = self._bursty_classes(rng, n, self.probs, self.B)
        ctx = np.where(bursty[:, None], b_ctx, ctx)
        query = np.where(bursty, b_query, query)
        novel_means = None
        if novel.any():
            # the same bursty recipe on fresh means, redrawn on every call; novel classes are drawn uniformly
            # (not from the Zipf law), as in the reference generator, so a query's label stays uniform at alpha > 0
            novel_means = rng.normal(0, 1 / np.sqrt(self.D), (self.novel_classes, self.D)).astype(np.float32)
            n_ctx, n_query = self._bursty_classes(rng, n, zipf_probs(self.novel_classes, 0.0), self.B)
            ctx = np.where(novel[:, None], n_ctx, ctx)
            query = np.where(novel, n_query, query)
            bursty = bursty | novel
        return ctx, query, bursty, novel, novel_means

    # -- sequences -------------------------------------------------------------------------------------------
    def _embed(self, rng, classes: np.ndarray, novel: np.ndarray, novel_means) -> np.ndarray:
        items = self._items(rng, self.means, np.where(novel[:, None], 0, classes) if novel.any() else classes)
        if novel.any():
            nov = self._items(rng, novel_means, np.where(novel[:, None], classes, 0))
            items = np.where(novel[:, None, None], nov, items)
        return items

    def sample(self, rng: np.random.Generator, n: int, *, p_bursty: float | None = None, p_novel: float | None = None,
               label_shift: int = 0) -> Batch:
        """``n`` sequences. ``label_shift`` shows every context label as (ℓ+shift) mod L and targets the shifted
        query label (the swapped-label IC2 test)."""
        p_bursty = self.p_bursty if p_bursty is None else p_bursty
        p_novel = self.p_novel if p_novel is None else p_novel
        ctx, query, bursty, novel, novel_means = self.sample_classes(rng, n, p_bursty, p_novel)
        items = self._embed(rng, np.concatenate([ctx, query[:, None]], 1), novel, novel_means)
        labels = (np.concatenate([ctx, query[:, None]], 1) % self.L + label_shift) % self.L
        tokens = np.empty((n, self.seq_len, self.D), np.float32)
        tokens[:, 0:-1:2] = items[:, :-1]
        tokens[:, 1::2] = self.label_vecs[labels[:, :-1]]
        tokens[:, -1] = items[:, -1]
        offset = rng.integers(0, 2 * self.n_max + 1 - self.seq_len + 1, n)
        tag = np.where(novel, NOVEL_OFFSET, 0)
        return Batch(tokens, labels[:, -1].astype(np.int64), labels[:, :-1], ctx + tag[:, None], query + tag,
                     offset, bursty, novel)

    def eval_sets(self, seed_key: int, size: int) -> dict[str, Batch]:
        """The fixed test sets: ``ic`` (novel classes, bursty), ``ic2`` (training classes, labels shown shifted by
        one), ``iw`` (non-bursty training classes) and ``train`` (the training distribution)."""
        out = {}
        for i, name in enumerate(("ic", "ic2", "iw", "train")):
            rng = rng_for(self.seed, seed_key, i)
            if name == "ic":
                out[name] = self.sample(rng, size, p_bursty=1.0, p_novel=1.0)
            elif name == "ic2":
                out[name] = self.sample(rng, size, p_bursty=1.0, p_novel=0.0, label_shift=1)
            elif name == "iw":
                out[name] = self.sample(rng, size, p_bursty=0.0, p_novel=0.0)
            else:
                out[name] = self.sample(rng, size)
        return out


class MultimodalWorld:
    """Pairs of a primary item (the ``ICLWorld`` M1, the stage-1 world when seeds match) and a secondary one.

    ``ic_m2only`` is the diagnostic set: the IC test with every query's primary item replaced by an item of a
    *different* primary class with the same label, so matching the query to its context pair must use M2.
    """

    def __init__(self, primary: ICLWorld, K2: int, D2: int = 64, L2: int = 16, eps2: float = 0.1, alpha2: float = 0.0,
                 seed: int = 0):
        check_params(K2, L2, primary.N, primary.B, where="icl.multimodal")
        if L2 > primary.L:
            raise ValueError(f"icl.multimodal: L2={L2} must be <= the primary label count L={primary.L}")
        if 3 * primary.N + 2 > 2 * primary.n_max + 1:
            raise ValueError(f"icl.data: n_max={primary.n_max} too small for the multimodal sequence (3N+2 tokens)")
        self.m1, self.K2, self.D2, self.L2, self.eps2, self.alpha2, self.seed = primary, K2, D2, L2, eps2, alpha2, seed
        rng = rng_for(seed, _WORLD2)
        self.means2 = rng.normal(0, 1 / np.sqrt(D2), (K2, D2)).astype(np.float32)
        self.probs2 = zipf_probs(K2, alpha2)
        # K_c2 = max(L2, ⌊128·K2/K1 / L2⌋·L2) novel secondary classes, as in the official code
        self.novel2 = max(L2, (primary.novel_classes * K2 // primary.K) // L2 * L2)

    @property
    def seq_len(self) -> int:
        return 3 * self.m1.N + 2

    def _primary_for(self, rng, labels: np.ndarray, K1: int, probs1: np.ndarray) -> np.ndarray:
        """A primary class with the given label, drawn ∝ P1 restricted to that label's classes (k ≡ ℓ mod L)."""
        L = self.m1.L
        per = probs1.reshape(K1 // L, L).T  # per[ℓ, j] = P1(ℓ + L·j)
        cdf = np.cumsum(per / per.sum(1, keepdims=True), axis=1)
        j = (rng.random(labels.shape)[..., None] > cdf[labels]).sum(-1)
        return labels + L * np.minimum(j, K1 // L - 1)

    def sample(self, rng, n: int, *, p_bursty: float | None = None, novel: bool = False, label_shift: int = 0,
               m2only: bool = False) -> Batch:
        m1, N = self.m1, self.m1.N
        p_bursty = m1.p_bursty if p_bursty is None else p_bursty
        K1 = m1.novel_classes if novel else m1.K
        K2 = self.novel2 if novel else self.K2
        # novel classes are drawn uniformly, as in the reference generator (the Zipf law is for training classes)
        probs1 = zipf_probs(K1, 0.0) if novel else m1.probs
        probs2 = zipf_probs(K2, 0.0) if novel else self.probs2
        means1 = rng.normal(0, 1 / np.sqrt(m1.D), (K1, m1.D)).astype(np.float32) if novel else m1.means
        means2 = rng.normal(0, 1 / np.sqrt(self.D2), (K2, self.D2)).astype(np.float32) if novel else self.means2
        # pairs: draw the M2 class, then an M1 class of the same label; N/B pairs repeated B times and shuffled
        B = m1.B
        n_distinct = N // B
        c2 = rng.choice(K2, size=(n, n_distinct), p=probs2)
        c1 = self._primary_for(rng, c2 % self.L2, K1, probs1)
        idx = np.argsort(rng.random((n, N)), axis=1) // B  # a shuffled multiset of each pair index B times
        b_c1, b_c2 = np.take_along_axis(c1, idx, 1), np.take_along_axis(c2, idx, 1)
        q = rng.integers(0, N, n)
        b_q1, b_q2 = b_c1[np.arange(n), q], b_c2[np.arange(n), q]
        # non-bursty: i.i.d. pairs and an independent query pair
        i_c2 = rng.choice(K2, size=(n, N + 1), p=probs2)
        i_c1 = self._primary_for(rng, i_c2 % self.L2, K1, probs1)
        bursty = rng.random(n) < p_bursty
        ctx1 = np.where(bursty[:, None], b_c1, i_c1[:, :N])
        ctx2 = np.where(bursty[:, None], b_c2, i_c2[:, :N])
        q1, q2 = np.where(bursty, b_q1, i_c1[:, N]), np.where(bursty, b_q2, i_c2[:, N])
        if m2only:
            # a different primary class of the same label: shift by a non-zero multiple of L (mod K1)
            per_label = K1 // m1.L
            if per_label < 2:
                raise ValueError("icl.multimodal: the M2-only diagnostic needs at least 2 primary classes per label")
            q1 = (q1 + m1.L * rng.integers(1, per_label, n)) % K1
        cls1 = np.concatenate([ctx1, q1[:, None]], 1)
        cls2 = np.concatenate([ctx2, q2[:, None]], 1)
        noise = rng.normal(0, 1 / np.sqrt(m1.D), cls1.shape + (m1.D,))
        x1 = ((means1[cls1] + m1.eps * noise) / np.sqrt(1 + m1.eps ** 2)).astype(np.float32)
        noise2 = rng.normal(0, 1 / np.sqrt(self.D2), cls2.shape + (self.D2,))
        x2 = ((means2[cls2] + self.eps2 * noise2) / np.sqrt(1 + self.eps2 ** 2)).astype(np.float32)
        labels = (cls2 % self.L2 + label_shift) % self.L2
        tokens = np.zeros((n, self.seq_len, m1.D), np.float32)
        tokens[:, 0:3 * N:3] = x1[:, :N]
        tokens[:, 2:3 * N:3] = m1.label_vecs[labels[:, :N]]
        tokens[:, 3 * N] = x1[:, N]
        offset = rng.integers(0, 2 * m1.n_max + 1 - self.seq_len + 1, n)
        tag = NOVEL_OFFSET if novel else 0
        flags = np.full(n, novel)
        return Batch(tokens, labels[:, N].astype(np.int64), labels[:, :N], ctx1 + tag, q1 + tag, offset, bursty,
                     flags, m2=x2, ctx_classes2=ctx2 + tag, query_class2=q2 + tag)

    def eval_sets(self, seed_key: int, size: int) -> dict[str, Batch]:
        specs = {"ic": dict(p_bursty=1.0, novel=True), "ic2": dict(p_bursty=1.0, label_shift=1),
                 "iw": dict(p_bursty=0.0), "train": {}, "ic_m2only": dict(p_bursty=1.0, novel=True, m2only=True)}
        return {name: self.sample(rng_for(self.seed, seed_key, 10 + i), size, **kw)
                for i, (name, kw) in enumerate(specs.items())}
