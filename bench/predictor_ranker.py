"""Would a learned ranker beat the predictor's frozen-embedding stack? Prints a table.

    .venv/bin/python bench/predictor_ranker.py [--ranker finetune|toplayer|mlp|stacker] [--folds 5]
        [--epochs 3] [--max-folds N] [--holdout-generator NAME]

Per fold (the folds of ``alise predictor eval``: split by prompt, seed 0), on the AlpacaEval
files: the estimator as served (``LengthEstimator``, frozen MiniLM embeddings + heads +
neighbours), and a *ranker* trained on the training prompts' prompt effect (mean over models
of log length minus the model's mean) with a pairwise logistic loss weighted by the effect
gap plus a small squared-error term:

- ``finetune``: all-MiniLM-L6-v2 itself fine-tuned (fp32 torch, CPU), mean-pooled, a linear
  head;
- ``toplayer``: a copy of the encoder's top layer (MiniLM's fifth, the one the served vector
  is pooled from) fine-tuned over the frozen states of the layers below it, mean-pooled, a
  linear head: a ranker that would share the encoder's forward pass up to that layer;
- ``mlp``: a ranking head over the served (frozen) vectors: dropout, one hidden layer of 64
  (GELU), full-batch AdamW, 300 steps;
- ``stacker``: the estimator itself with each stacker's weights fitted for pairwise order of
  the log-lengths (L-BFGS over 200,000 sampled pairs), then only a scale and bias fitted for
  absolute error (the order stays the pairwise one).

Kendall tau per model, averaged; ``blend`` averages the two predictions' per-model ranks.
With ``--holdout-generator`` the held-out model's lengths are left out of both trainings and
only it is scored. Reports training time and peak memory.
"""

from __future__ import annotations

import argparse
import glob
import resource
import time

import numpy as np
from scipy import stats

DATA = sorted(glob.glob("/work/shared/data/alpaca_eval/*.jsonl.gz"))


def pairwise_loss(p, y):
    """Pairwise logistic loss weighted by the target gap, plus 0.1 x squared error."""
    import torch

    gap = y[:, None] - y[None, :]
    pair = torch.nn.functional.softplus(-torch.sign(gap) * (p[:, None] - p[None, :]))
    return (pair * gap.abs()).sum() / gap.abs().sum().clamp(min=1e-6) + 0.1 * ((p - y) ** 2).mean()


def train_and_score(score, groups, modules, effect, train, test, *, epochs: int, seed: int,
                    batch_size: int = 16):
    """Trains ``score`` (indices -> scores) on ``train`` in shuffled batches (AdamW over
    ``groups``, warm-up then linear decay); returns its scores of ``test``."""
    import torch

    steps = epochs * -(-len(train) // batch_size)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, (steps - s) / steps))
    target = torch.tensor(effect, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    for m in modules:
        m.train()
    for _ in range(epochs):
        order = rng.permutation(train)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = pairwise_loss(score(idx), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for m in modules:
        m.eval()
    with torch.inference_mode():
        return np.concatenate([score(test[i:i + 64]).numpy() for i in range(0, len(test), 64)])


def finetune_scores(texts, effect, train, test, *, epochs: int, max_len: int = 128, seed: int = 0):
    """The ranker's scores for ``test`` after fine-tuning on ``train`` (indices into texts)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from alise.predictor.tokens import default_model_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModel.from_pretrained(default_model_path())
    head = torch.nn.Linear(model.config.hidden_size, 1)

    def score(idx):
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                return_tensors="pt")
        h = model(**b).last_hidden_state
        mask = b["attention_mask"][..., None].float()
        return head((h * mask).sum(1) / mask.sum(1)).squeeze(1)

    return train_and_score(score, [{"params": model.parameters(), "lr": 5e-5},
                                   {"params": head.parameters(), "lr": 1e-3}],
                           [model], effect, train, test, epochs=epochs, seed=seed)


def toplayer_scores(texts, effect, train, test, *, epochs: int, layers: int = 5, max_len: int = 256,
                    seed: int = 0):
    """The scores for ``test`` of layer ``layers`` fine-tuned over frozen layers below it."""
    import copy

    import torch
    from transformers import AutoModel, AutoTokenizer

    from alise.predictor.tokens import default_model_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModel.from_pretrained(default_model_path()).eval()
    below = []  # frozen states entering the trained layer, one (tokens, hidden) tensor a prompt
    with torch.inference_mode():
        for text in texts:
            b = tok([text], truncation=True, max_length=max_len, return_tensors="pt")
            below.append(model(**b, output_hidden_states=True).hidden_states[layers - 1][0].clone())
    layer = copy.deepcopy(model.encoder.layer[layers - 1])
    head = torch.nn.Linear(model.config.hidden_size, 1)

    def score(idx):
        states = torch.nn.utils.rnn.pad_sequence([below[i] for i in idx], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(below[i])) for i in idx], batch_first=True)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        out = layer(states, attention_mask=bias)
        h = out[0] if isinstance(out, tuple) else out
        m = mask[..., None]
        return head((h * m).sum(1) / m.sum(1)).squeeze(1)

    return train_and_score(score, [{"params": layer.parameters(), "lr": 1e-4},
                                   {"params": head.parameters(), "lr": 1e-3}],
                           [layer], effect, train, test, epochs=epochs, seed=seed)


def mlp_scores(vectors, effect, train, test, *, epochs: int = 300, hidden: int = 64, seed: int = 0):
    """The scores of a pairwise-trained head over frozen ``vectors`` for ``test``."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(vectors.shape[1], hidden),
                              torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    x = torch.tensor(vectors[train], dtype=torch.float32)
    y = torch.tensor(effect[train], dtype=torch.float32)
    for _ in range(epochs):
        loss = pairwise_loss(net(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return net(torch.tensor(vectors[test], dtype=torch.float32)).squeeze(1).numpy()


def pairwise_stacker():
    """A Stacker whose weights order pairs; then a scale and bias fitted for absolute error."""
    from scipy.optimize import minimize

    from alise.predictor.stacker import Stacker

    class PairwiseStacker(Stacker):
        def fit(self, features, log_lengths, offsets):
            rng = np.random.default_rng(0)
            n = len(features)
            i, j = rng.integers(0, n, 200_000), rng.integers(0, n, 200_000)
            target = log_lengths - offsets
            gap = target[i] - target[j]
            keep = gap != 0
            i, j, gap = i[keep], j[keep], gap[keep]
            self._mu, self._sd = features.mean(0), features.std(0) + 1e-9
            x = (features - self._mu) / self._sd
            dx, w, sign = x[i] - x[j], np.abs(gap), np.sign(gap)

            def loss(v):
                a = sign * (dx @ v)
                grad = -(w * sign / (1 + np.exp(a))) @ dx / w.sum() + 2e-3 * v
                return (w * np.logaddexp(0, -a)).sum() / w.sum() + 1e-3 * v @ v, grad

            self._v = minimize(loss, np.full(x.shape[1], 1 / x.shape[1]), jac=True, method="L-BFGS-B").x
            super().fit((x @ self._v)[:, None], log_lengths, offsets)

        def predict(self, features, offsets):
            if features.shape[1] > 1:  # the raw features: to the one pairwise score
                features = (((features - self._mu) / self._sd) @ self._v)[:, None]
            return super().predict(features, offsets)

    return PairwiseStacker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranker", choices=("finetune", "toplayer", "mlp", "stacker"), default="finetune")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-folds", type=int, default=None, help="run only the first N folds")
    parser.add_argument("--holdout-generator", default=None)
    args = parser.parse_args()
    import torch

    from alise.predictor.datasets import load_records
    from alise.predictor.encoder import Encoder
    from alise.predictor.estimator import LengthEstimator
    from alise.predictor.evaluate import build_corpus
    from alise.predictor.fitting import refit
    from alise.predictor.history import History
    from alise.predictor.index import VectorIndex
    from alise.predictor.tokens import TokenCounter

    torch.set_num_threads(2)
    records = [r for path in DATA for r in load_records(path)]
    encoder = Encoder()
    corpus_encoder = encoder.name
    corpus = build_corpus(records, encoder, TokenCounter())
    models = sorted(set(corpus.obs_model))
    obs_model = np.asarray(corpus.obs_model)
    ly = np.log1p(corpus.obs_tokens.astype(np.float64))
    fold_of = np.random.default_rng(0).permutation(len(corpus.texts)) % args.folds
    scored = [args.holdout_generator] if args.holdout_generator else models
    rows = []
    print(f"{'fold':>4} {'estimator':>10} {'ranker':>8} {'blend':>8} {'train s':>8} {'peak RSS MB':>12}")
    for fold in range(args.max_folds or args.folds):
        train_p = np.flatnonzero(fold_of != fold)
        test_p = np.flatnonzero(fold_of == fold)
        visible = np.isin(corpus.obs_prompt, train_p) & (obs_model != args.holdout_generator)
        offsets = {m: ly[visible & (obs_model == m)].mean() for m in models if (visible & (obs_model == m)).any()}
        res = ly - np.array([offsets.get(m, 0.0) for m in corpus.obs_model])
        effect = np.zeros(len(corpus.texts))
        np.add.at(effect, corpus.obs_prompt[visible], res[visible])
        effect /= np.maximum(np.bincount(corpus.obs_prompt[visible], minlength=len(corpus.texts)), 1)
        started = time.perf_counter()
        if args.ranker == "finetune":
            scores = finetune_scores(corpus.texts, effect, train_p, test_p, epochs=args.epochs)
        elif args.ranker == "toplayer":
            scores = toplayer_scores(corpus.texts, effect, train_p, test_p, epochs=args.epochs)
        elif args.ranker == "mlp":
            scores = mlp_scores(corpus.vectors, effect, train_p, test_p)
        else:  # per model, from the pairwise estimator below
            scores = np.zeros(len(test_p))
        ranker = dict(zip(test_p, scores, strict=True))
        train_s = time.perf_counter() - started
        history = History(VectorIndex(corpus.vectors.shape[1]))
        new_rows = history.add_prompts([corpus.texts[r] for r in train_p], corpus.vectors[train_p],
                                       corpus.prompt_tokens[train_p])
        row_of = dict(zip(train_p.tolist(), new_rows.tolist(), strict=True))
        history.add_observations(np.array([row_of[p] for p in corpus.obs_prompt[visible]]),
                                 list(obs_model[visible]), corpus.obs_tokens[visible])
        estimator = LengthEstimator(history)
        refit(estimator)
        if args.ranker == "stacker":
            import alise.predictor.fitting as fitting

            served, fitting.Stacker = fitting.Stacker, pairwise_stacker()
            started = time.perf_counter()
            pairwise = LengthEstimator(history)
            refit(pairwise)
            train_s = time.perf_counter() - started
            fitting.Stacker = served
        taus = {"estimator": [], "ranker": [], "blend": []}
        for m in scored:
            sel = (obs_model == m) & np.isin(corpus.obs_prompt, test_p)
            prompts = corpus.obs_prompt[sel]
            y = corpus.obs_tokens[sel]
            est = estimator.predict(corpus.vectors[prompts], [corpus.texts[p] for p in prompts],
                                    corpus.prompt_tokens[prompts], m).p50
            rank = np.array([ranker[p] for p in prompts]) if args.ranker != "stacker" else \
                pairwise.predict(corpus.vectors[prompts], [corpus.texts[p] for p in prompts],
                                 corpus.prompt_tokens[prompts], m).p50
            blend = stats.rankdata(est) + stats.rankdata(rank)
            for name, pred in (("estimator", est), ("ranker", rank), ("blend", blend)):
                taus[name].append(stats.kendalltau(pred, y).statistic)
        row = {k: float(np.mean(v)) for k, v in taus.items()}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{fold:>4} {row['estimator']:10.3f} {row['ranker']:8.3f} {row['blend']:8.3f} "
              f"{train_s:8.0f} {rss:12.0f}", flush=True)
        rows.append(row)
    mean = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
    print(f"{'mean':>4} {mean['estimator']:10.3f} {mean['ranker']:8.3f} {mean['blend']:8.3f}  "
          f"(ranker {args.ranker}, encoder {corpus_encoder}, {len(scored)} model(s); "
          f"load {__import__('os').getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
