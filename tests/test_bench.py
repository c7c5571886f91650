"""bench/ on the CPU: Table I from synthetic ablation and MT-bench files (bench.heads), the figures
(bench.plots) and the multi-temperature measurement loop with its time budget (bench.mtbench),
with fake generators standing in for the GPU."""
import json
from types import SimpleNamespace

import pytest

from bench import heads as bh
from bench import mtbench as bm
from bench import plots as bp

# tau, speedup, alpha of each ablation head in the synthetic MT-bench files. Medusa: tau gain
# 1.55 - 1.20 = +0.35 (met), speedup gain 0.90 / 0.80 - 1 = +12.5% (not met). EAGLE: tau gain
# 1.75 - 1.50 = +0.25 (not met), speedup gain 0.84 / 0.70 - 1 = +20% (met).
EVALS = {
    "medusa": {(1, False): (1.20, 0.80), (1, True): (1.25, 0.82), (2, False): (1.30, 0.83),
               (2, True): (1.45, 0.90), (3, False): (1.35, 0.81), (3, True): (1.55, 0.88)},
    "eagle": {(1, False): (1.50, 0.70), (1, True): (1.52, 0.72), (2, False): (1.60, 0.78),
              (2, True): (1.70, 0.84), (3, False): (1.62, 0.75), (3, True): (1.75, 0.80)},
}


def name(kind, k, adv):
    return f"{kind}-k{k}-{'adv' if adv else 'base'}"


def ablation(skip=()):
    out = {}
    for kind, rows in EVALS.items():
        for (k, adv) in rows:
            n = name(kind, k, adv)
            if n in skip:
                continue
            out[n] = {"status": "finished", "step": 100, "steps": 100, "train_seconds": 60.0 * k,
                      "tokens_seen": 1_000_000, "tokens_per_s": 20000.0 / k,
                      "final_eval": {"eval/top1": [0.4, 0.3, 0.2][:k]}, "device": "NVIDIA H100 80GB HBM3"}
    return out


def mtbench_file(kind, commit, extra_methods=(), skip=()):
    methods = []
    for (k, adv), (tau, sp) in EVALS[kind].items():
        n = name(kind, k, adv)
        if n in skip:
            continue
        for mode in ("chain", "tree"):   # tree rows must not enter Table I
            methods.append({"head": f"runs/ablation/{n}/head", "kind": kind, "K": k, "mode": mode,
                            "tau": tau if mode == "chain" else tau + 1, "alpha": [0.5, 0.4, 0.3] if mode == "chain" else None,
                            "tokens_per_s": 1000 * sp, "speedup": sp if mode == "chain" else 9.0,
                            "identical_to_plain": 1.0, "per_category": {}, "depth": 5})
    return {"device": "NVIDIA H100 80GB HBM3", "date": "2025-01-01", "commit": commit,
            "command": f"python -m bench.mtbench --out {kind}.json", "settings": {"temperature": 0.0, "questions": 80},
            "plain": {"tokens_per_s": 1000.0}, "methods": methods + list(extra_methods)}


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("KOALA_COMMIT", "c0ffee0000")
    (tmp_path / "ablation.json").write_text(json.dumps(ablation()))
    (tmp_path / "medusa.json").write_text(json.dumps(mtbench_file("medusa", "aaaaaaa111")))
    (tmp_path / "eagle.json").write_text(json.dumps(mtbench_file("eagle", "bbbbbbb222")))
    return tmp_path


def run_heads(tmp_path, evals=("medusa.json", "eagle.json")):
    return bh.main(["--ablation", str(tmp_path / "ablation.json"),
                    "--evals", ",".join(str(tmp_path / e) for e in evals)])


def test_heads_targets(inputs):
    heads, summ = run_heads(inputs)
    assert len(heads) == 12
    m, e = summ["medusa"], summ["eagle"]
    assert m["best_tau_head"] == "medusa-k3-adv" and m["tau_gain"] == pytest.approx(0.35)
    assert m["tau_target_met"] is True
    assert m["best_speedup_head"] == "medusa-k2-adv" and m["speedup_gain"] == pytest.approx(0.125)
    assert m["speedup_target_met"] is False
    assert e["tau_gain"] == pytest.approx(0.25) and e["tau_target_met"] is False
    assert e["speedup_gain"] == pytest.approx(0.20) and e["speedup_target_met"] is True
    assert heads["eagle-k2-adv"]["eval"]["tau"] == 1.70          # the chain row, not the tree row


def test_heads_files_and_table(inputs, capsys):
    run_heads(inputs)
    out = inputs / "out"
    data = json.loads((out / "heads.json").read_text())
    assert data["commit"] == "c0ffee0000"                        # this run, via bench.common.write
    assert [s["commit"] for s in data["sources"]["evals"]] == ["aaaaaaa111", "bbbbbbb222"]  # the sources'
    assert data["sources"]["ablation"]["devices"] == ["NVIDIA H100 80GB HBM3"]
    md = (out / "heads_table.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 12
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[0] for c in cells] == ["Medusa"] + [""] * 5 + ["EAGLE"] + [""] * 5
    assert [(c[1], c[2]) for c in cells[:2]] == [("1", "w/o adv."), ("1", "w/ adv.")]
    # Medusa K=3 w/ adv.: best tau in bold, alphas, speedup, training seconds and tokens/s
    assert cells[5][1:9] == ["3", "w/ adv.", "**1.55**", "0.50", "0.40", "0.30", "0.88x", "180"]
    assert cells[5][9] == "6,667"
    assert cells[3][7] == "**0.90x**"                             # Medusa K=2 w/ adv.: best speedup
    printed = capsys.readouterr().out
    assert "**+0.35** (target >= +0.3: met)" in printed
    assert "**+12.5%** (target >= +15%: not met)" in printed
    assert "**+20.0%** (target >= +15%: met)" in printed
    assert "**+0.35**" in md


def test_heads_missing_and_mismatched(inputs):
    (inputs / "ablation.json").write_text(json.dumps(ablation(skip={"eagle-k3-base"})))
    (inputs / "eagle.json").write_text(json.dumps(mtbench_file("eagle", "b", skip={"eagle-k1-base"})))
    heads, summ = run_heads(inputs)
    assert heads["eagle-k3-base"]["training"] is None and heads["eagle-k3-base"]["eval"] is not None
    assert heads["eagle-k1-base"]["eval"] is None
    assert "eagle-k1-base" in summ["eagle"]["note"]
    md = (inputs / "out" / "heads_table.md").read_text()
    assert "no comparison" in md
    bad = mtbench_file("medusa", "a")
    bad["methods"][0]["K"] = 3                                   # a K=3 head saved under a k1 name
    (inputs / "medusa.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="name says medusa K=1"):
        run_heads(inputs)


def sampling_file(tmp_path):
    methods = []
    for kind in ("eagle", "medusa"):
        for mode in ("chain", "tree"):
            for t, (tau, sp) in {0.0: (1.8, 0.85), 0.7: (1.6, 0.8), 1.0: (1.5, 0.75)}.items():
                methods.append({"head": f"koala/default_heads/{kind}", "kind": kind, "K": 2, "mode": mode,
                                "temperature": t, "tau": tau, "speedup": sp, "tokens_per_s": 800})
    p = tmp_path / "sampling.json"
    p.write_text(json.dumps({"device": "NVIDIA H100", "commit": "ddddddd", "settings": {"temperatures": [0, 0.7, 1]},
                             "methods": methods}))
    return p


def test_plots(inputs, capsys):
    run_heads(inputs)
    s = sampling_file(inputs)
    figs = inputs / "figs"
    written = bp.main(["--heads", str(inputs / "out" / "heads.json"), "--defaults", str(s), "--sampling", str(s),
                       "--spec-cost", str(inputs / "missing.json"), "--mtbench", str(inputs / "missing.json"),
                       "--out-dir", str(figs)])
    names = ["fig4_speedup.png", "fig5_speedup_vs_k.png", "fig6_adversarial.png", "sampling.png"]
    assert sorted(p.name for p in written) == sorted(names)
    for n in names:
        assert (figs / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "cost_vs_k.png: skipped" in out and "mtbench_heads.png: skipped" in out


def test_plots_skip_missing(tmp_path, capsys):
    written = bp.main(["--heads", str(tmp_path / "none.json"), "--sampling", str(tmp_path / "none.json"),
                       "--only", "fig4,fig5,fig6,sampling", "--out-dir", str(tmp_path)])
    assert written == [] and not list(tmp_path.glob("*.png"))
    out = capsys.readouterr().out
    for n in ("fig4_speedup.png", "fig5_speedup_vs_k.png", "fig6_adversarial.png", "sampling.png"):
        assert f"{n}: skipped" in out
    with pytest.raises(SystemExit):
        bp.main(["--only", "fig7"])


# --------------------------------------------------------------- bench.mtbench without a GPU
class FakeGen:
    """Stands in for SpeculativeGenerator: 10 tokens per answer in (1 + T) * wall seconds; the
    speculative one accepts 2, 0, 1 drafted tokens over three iterations."""

    def __init__(self, wall, accepted=(), spec=True):
        self.wall, self.accepted, self.calls = wall, list(accepted), []
        self.spec = SimpleNamespace(depth=4, N=5, k=1) if spec else None

    def warmup(self, temperatures):
        self.calls += [(T, None, True) for T in temperatures]

    def generate(self, prompt, max_new_tokens, temperature=0.0, seed=None):
        self.calls.append((temperature, seed, False))
        st = SimpleNamespace(new_tokens=10, wall_s=self.wall * (1 + temperature), target_forwards=3,
                             accepted_per_step=self.accepted)
        return SimpleNamespace(text="x", token_ids=[1, 2, 3], stats=st)


QS = [{"question_id": i, "category": c, "turns": ["a", "b"]} for i, c in enumerate(["writing", "math"])]


def methods(*names):
    cfg = SimpleNamespace(kind="eagle", layers=2)
    return [(n, "chain", lambda: (FakeGen(0.5, [2, 0, 1]), cfg)) for n in names]


def test_mtbench_temperatures():
    plain = FakeGen(1.0, spec=False)
    saved = []
    res, _ = bm.measure(plain, methods("h1"), QS, [0.0, 0.7], 16, seed=5, progress=False, save=saved.append)
    assert [p["temperature"] for p in res["plain_by_temperature"]] == [0.0, 0.7]
    assert res["plain_by_temperature"][1]["tokens_per_s"] == pytest.approx(10 / 1.7)  # its own plain speed
    assert "plain" not in res and res["incomplete"] is False and saved
    assert [m["temperature"] for m in res["methods"]] == [0.0, 0.7]
    for m in res["methods"]:
        assert m["speedup"] == pytest.approx(2.0)                 # against plain at the same T
        assert m["tau"] == pytest.approx(2.0)
        assert m["alpha"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert res["methods"][0]["identical_to_plain"] == 1.0 and "identical_to_plain" not in res["methods"][1]
    # each temperature is warmed up (all windows' graphs) before its timed runs
    assert [c[0] for c in plain.calls if c[2]] == [0.0, 0.7]
    assert plain.calls.index((0.7, None, True)) > max(i for i, c in enumerate(plain.calls) if c[:2] == (0.0, None)
                                                      and not c[2])
    timed = [c for c in plain.calls if not c[2]]
    assert {(t, s) for t, s, _ in timed} == {(0.0, None), (0.7, 5), (0.7, 6)}   # seeded turns at T > 0 only


def test_summarise_alpha_stops_at_the_chain_depth():
    recs = [{"new_tokens": 5, "wall_s": 1.0, "accepted": [1, 0, 1, 1]}]
    assert bm.summarise(recs, True, 1)["alpha"] == pytest.approx([3 / 4])     # no 2- or 3-alpha at d=1
    assert bm.summarise(recs, True, 3)["alpha"] == pytest.approx([3 / 4, 0.0, 0.0])
    assert "alpha" not in bm.summarise(recs, False, 3)                        # trees: tau only


def test_mtbench_time_budget():
    ticks = iter(range(0, 1000, 10))
    res, _ = bm.measure(FakeGen(1.0, spec=False), methods("h1", "h2", "h3"), QS, [0.0], 16, seed=0,
                        time_budget=15, t0=0, progress=False, clock=lambda: next(ticks))
    assert [m["head"] for m in res["methods"]] == ["h1"]
    assert res["not_run"] == ["h2 chain", "h3 chain"] and res["incomplete"] is True
    assert res["plain"]["tokens_per_s"] == pytest.approx(10.0)  # one temperature: the old layout too


def test_parse_temperatures():
    assert bm.parse_temperatures("", 0.7) == [0.7]
    assert bm.parse_temperatures("0,0.7,1.0", 0.0) == [0.0, 0.7, 1.0]
    for bad in ("0,0", "-1", "a"):
        with pytest.raises(SystemExit):
            bm.parse_temperatures(bad, 0.0)


def test_bench_dispatcher_lists_and_runs(capsys):
    from pathlib import Path

    from bench.__main__ import BENCHES, main
    here = Path(__file__).resolve().parents[1] / "bench"
    assert all((here / f"{name}.py").is_file() for name in BENCHES)   # the list cannot go stale
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in BENCHES)
    assert main(["no-such-bench"]) == 2
    try:
        main(["heads", "--help"])
    except SystemExit as e:                       # argparse's --help exits 0 after printing usage
        assert e.code == 0
    assert "--ablation" in capsys.readouterr().out


def test_heads_depth_filter_picks_one_depth():
    """A file measuring several chain depths: --depth keeps that depth's rows only; without it the
    later row wins (and the merge says so)."""
    ev = mtbench_file("eagle", "ccccccc333")
    extra = [dict(m, depth=1, tau=m["tau"] - 0.3) for m in ev["methods"] if m["mode"] == "chain"]
    ev["methods"] = ev["methods"] + extra
    both = bh.merge(ablation(), [("e.json", ev)], depth=None)
    d5 = bh.merge(ablation(), [("e.json", ev)], depth=5)
    d1 = bh.merge(ablation(), [("e.json", ev)], depth=1)
    assert d5["eagle-k2-adv"]["eval"]["tau"] == 1.70 and d5["eagle-k2-adv"]["eval"]["depth"] == 5
    assert d1["eagle-k2-adv"]["eval"]["tau"] == pytest.approx(1.40) and d1["eagle-k2-adv"]["eval"]["depth"] == 1
    assert both["eagle-k2-adv"]["eval"]["depth"] == 1                  # the later row
    assert bh.merge(ablation(), [("e.json", ev)], depth=3)["eagle-k2-adv"]["eval"] is None


def test_heads_alias_names_a_shipped_head(inputs):
    """--alias: a head evaluated at a path that does not say its name (a shipped copy) joins its
    ablation row; a bad alias is refused with what to write."""
    ev = mtbench_file("eagle", "ddddddd444", skip=("eagle-k3-adv",))
    ev["methods"].append({"head": "koala/default_heads/eagle", "kind": "eagle", "K": 3, "mode": "chain",
                          "tau": 1.9, "alpha": [0.6], "tokens_per_s": 900.0, "speedup": 0.9,
                          "identical_to_plain": 1.0, "depth": 1})
    (inputs / "shipped.json").write_text(json.dumps(ev))
    args = ["--ablation", str(inputs / "ablation.json"), "--evals", str(inputs / "shipped.json")]
    heads, _ = bh.main(args)
    assert heads["eagle-k3-adv"]["eval"] is None                       # unnamed without the alias
    heads, summ = bh.main(args + ["--alias", "koala/default_heads/eagle/=eagle-k3-adv"])
    assert heads["eagle-k3-adv"]["eval"]["tau"] == 1.9
    assert summ["eagle"]["best_tau_head"] == "eagle-k3-adv"
    with pytest.raises(SystemExit, match="PATH=NAME"):
        bh.main(args + ["--alias", "koala/default_heads/eagle=shipped"])
    with pytest.raises(SystemExit, match="K=3 head, but its name says eagle K=2"):
        bh.main(args + ["--alias", "koala/default_heads/eagle=eagle-k2-adv"])


class DriftingGen(FakeGen):
    """A plain generator whose speed changes between its measurements (walls of successive whole
    runs of len(QS) * 2 turns are taken from `walls`)."""

    def __init__(self, walls):
        super().__init__(walls[0], spec=False)
        self.walls, self.turns = list(walls), 0

    def generate(self, prompt, max_new_tokens, temperature=0.0, seed=None):
        self.wall = self.walls[min(self.turns // (2 * len(QS)), len(self.walls) - 1)]
        self.turns += 1
        return super().generate(prompt, max_new_tokens, temperature, seed)


def test_mtbench_plain_rebracketing():
    """plain_every=2 with three methods: plain runs at the start, after method 2 and at the end;
    methods 1-2 use the mean of runs 1 and 2, method 3 the mean of runs 2 and 3."""
    plain = DriftingGen([1.0, 0.5, 0.25])          # plain: 10, 20, 40 tokens/s
    res, _ = bm.measure(plain, methods("h1", "h2", "h3"), QS, [0.0], 16, seed=0, progress=False, plain_every=2)
    assert [r["tokens_per_s"] for r in res["plain_runs"]] == pytest.approx([10.0, 20.0, 40.0])
    assert [r["after_methods"] for r in res["plain_runs"]] == [0, 2, 3]
    sp = [m["speedup"] for m in res["methods"]]    # each method runs at 20 tokens/s
    assert sp == pytest.approx([20 / 15, 20 / 15, 20 / 30])
    assert res["methods"][0]["speedup_bounds"] == pytest.approx([1.0, 2.0])
    assert res["methods"][2]["speedup_bounds"] == pytest.approx([0.5, 1.0])
    assert all(m["plain_bracketed"] for m in res["methods"])
    assert res["methods"][0]["per_category"]["math"]["speedup"] == pytest.approx(20 / 15)
    assert res["plain"]["tokens_per_s"] == pytest.approx(10.0)       # the first run, as before
    # plain_every=0: one plain run, speedups against it, nothing bracketed
    res0, _ = bm.measure(DriftingGen([1.0, 0.5]), methods("h1", "h2"), QS, [0.0], 16, seed=0, progress=False)
    assert len(res0["plain_runs"]) == 1 and [m["speedup"] for m in res0["methods"]] == pytest.approx([2.0, 2.0])
    assert not any(m["plain_bracketed"] for m in res0["methods"])


def test_mtbench_warm_questions_are_untimed():
    """warm_questions=2 answers two questions (four turns) before the first timed plain run: the
    drifting stand-in has moved to its second speed by then, so the slow start is not measured."""
    plain = DriftingGen([1.0, 0.5])               # 10, then 20 tokens/s
    res, base = bm.measure(plain, methods("h1"), QS, [0.0], 16, seed=0, progress=False, warm_questions=2)
    assert res["warm_questions"] == 2
    assert res["plain"]["tokens_per_s"] == pytest.approx(20.0)
    assert len(base[0.0]) == 2 * len(QS)            # the reference outputs are the timed run's only
    assert res["methods"][0]["speedup"] == pytest.approx(1.0)
    cold, _ = bm.measure(DriftingGen([1.0, 0.5]), methods("h1"), QS, [0.0], 16, seed=0, progress=False)
    assert cold["plain"]["tokens_per_s"] == pytest.approx(10.0)


def test_mtbench_time_budget_still_brackets():
    ticks = iter(range(0, 1000, 10))
    plain = DriftingGen([1.0, 0.5])
    res, _ = bm.measure(plain, methods("h1", "h2", "h3"), QS, [0.0], 16, seed=0, time_budget=15, t0=0,
                        progress=False, clock=lambda: next(ticks), plain_every=2)
    assert [m["head"] for m in res["methods"]] == ["h1"] and res["incomplete"]
    assert len(res["plain_runs"]) == 2 and res["methods"][0]["plain_bracketed"]   # the closing run still ran
    assert res["methods"][0]["speedup"] == pytest.approx(20 / 15)


def test_disc_probe_tells_apart_only_what_differs():
    """bench.disc_probe's discriminator: near 1.0 held-out accuracy when the fakes are flat
    distributions and the real ones peaked, 0.5 when fake == real."""
    import torch
    from bench.disc_probe import probe
    g = torch.Generator().manual_seed(0)

    def split(n):
        cond = torch.randn(n, 8, generator=g)
        real = torch.randn(n, 32, generator=g) * 4
        return cond, real
    (c1, r1), (c2, r2) = split(256), split(64)
    flat = probe((c1, r1, torch.zeros_like(r1)), (c2, r2, torch.zeros_like(r2)), "logprob", 150, 64, 1e-3, 1, 16)
    same = probe((c1, r1, r1), (c2, r2, r2), "prob", 60, 64, 1e-3, 1, 16)
    assert flat["held_out_accuracy"] > 0.9
    assert same["held_out_accuracy"] == pytest.approx(0.5, abs=0.01)   # identical inputs: one score for both
    with pytest.raises(ValueError, match="inputs must be one of"):
        probe((c1, r1, r1), (c2, r2, r2), "raw", 1, 8, 1e-3, 1, 16)


def test_batch_bench_runs_and_counts(tmp_path):
    # bench.batch's loop on the CPU with a tiny target and a saved head: every group's rows are
    # counted, tau only with a head, and batch 1 also goes through generate()
    from bench.batch import run
    from koala import load_target
    from koala.heads import DraftConfig
    from tests.helpers import make_hf_checkpoint
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cpu")
    head = DraftConfig(kind="medusa", layers=1).build(lt)
    head.save_pretrained(tmp_path / "head")
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    rows = run(lt, ["none", str(tmp_path / "head")], [1, 2], prompts, 5, 128, eager_batches=(2,))
    assert [(r["head"] == "none", r["batch"], r["groups"]) for r in rows] == [
        (True, 1, 4), (True, 2, 2), (False, 1, 4), (False, 2, 2)]
    for r in rows:
        assert r["new_tokens"] == 4 * 5 and r["tokens_per_s"] > 0
        assert (r["tau"] is None) == (r["head"] == "none")
        assert ("generate_tokens_per_s" in r) == (r["batch"] == 1)
        assert ("eager_tokens_per_s" in r) == (r["batch"] == 2) and r["cold_tokens_per_s"] > 0


def test_source_digest_names_the_code(tmp_path, monkeypatch):
    # results record a digest of the sources (bench.common.environment): equal for equal trees,
    # different after any edit or rename of a source file
    from bench import common
    for d in ("koala", "kernels", "bench", "train"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.py").write_text(f"x = '{d}'\n")
    monkeypatch.setattr(common, "_ROOT", tmp_path)
    a = common.source_digest()
    assert common.source_digest() == a and len(a) == 16
    (tmp_path / "kernels" / "m.py").write_text("x = 'kernels' \n")
    b = common.source_digest()
    assert b != a
    (tmp_path / "kernels" / "m.py").rename(tmp_path / "kernels" / "n.py")
    assert common.source_digest() != b
    assert "source_digest" in common.environment()


def _sweep_file(commit, rows):
    """A bench.mtbench file with one method per (head, mode, depth, tree_size, K, tau, speedup)."""
    methods = [{"head": head, "kind": "eagle" if "eagle" in head else "medusa", "K": k, "mode": mode,
                "depth": d, "tree_size": n, "tau": tau, "speedup": sp, "alpha": [0.5], "temperature": 0.0}
               for head, mode, d, n, k, tau, sp in rows]
    return {"device": "NVIDIA H200", "date": "2026-12-03", "commit": commit, "command": "python -m bench.mtbench",
            "settings": {"temperature": 0.0}, "methods": methods}


def test_depth_sweep_gains_per_setting(tmp_path, monkeypatch):
    """bench.depth: each head's tau per drafting setting; the best K >= 2 gain over the baseline
    at each setting, met only at >= +0.3; a shipped path is named by --labels."""
    from bench import depth as bd
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rows = [("/tmp/ablation/eagle-k1-base/head", "chain", 1, 2, 1, 1.50, 1.2),
            ("/tmp/ablation/eagle-k1-base/head", "chain", 5, 6, 1, 2.00, 0.9),
            ("/tmp/ablation/eagle-k1-base/head", "tree", 5, 32, 1, 2.80, 0.6),
            ("koala/default_heads/eagle", "chain", 1, 2, 3, 1.60, 1.2),
            ("koala/default_heads/eagle", "chain", 5, 6, 3, 2.35, 0.85),
            ("koala/default_heads/eagle", "tree", 5, 32, 3, 3.00, 0.6),
            ("runs/heads/eagle-k4-adv", "chain", 5, 6, 4, 2.25, 0.8)]
    (tmp_path / "e.json").write_text(json.dumps(_sweep_file("abcdef1", rows)))
    r = bd.main(["--evals", str(tmp_path / "e.json"), "--labels", "koala/default_heads/eagle/=eagle-k3-adv",
                 "--baselines", "eagle-k1-base", "--out", "sweep"])
    assert set(r["heads"]) == {"eagle-k1-base", "eagle-k3-adv", "eagle-k4-adv"}
    per = r["gains"]["eagle"]["settings"]
    assert per["chain d=1"]["best"] == "eagle-k3-adv" and per["chain d=1"]["best_gain"] == pytest.approx(0.10)
    assert not per["chain d=1"]["met"]
    assert per["chain d=5"]["best"] == "eagle-k3-adv" and per["chain d=5"]["best_gain"] == pytest.approx(0.35)
    assert per["chain d=5"]["met"] and per["chain d=5"]["gain"]["eagle-k4-adv"] == pytest.approx(0.25)
    assert per["tree N=32 d=5"]["best_gain"] == pytest.approx(0.20) and not per["tree N=32 d=5"]["met"]
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| eagle-k4-adv | 4 | — | 2.25 (0.80x) | — |" in md          # chain d=1, chain d=5, tree
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0


def test_depth_sweep_refuses_ambiguity(tmp_path):
    from bench import depth as bd
    row = ("/tmp/a/eagle-k1-base/head", "chain", 1, 2, 1, 1.5, 1.2)
    ev = _sweep_file("abcdef1", [row, row])
    with pytest.raises(SystemExit, match="measured twice"):
        bd.collect([("e.json", ev)], {})
    ev = _sweep_file("abcdef1", [row, ("/tmp/b/eagle-k1-base/head", "chain", 3, 4, 3, 1.9, 1.0)])
    with pytest.raises(SystemExit, match="share one label"):
        bd.collect([("e.json", ev)], {})
    with pytest.raises(SystemExit, match="no head labelled"):
        bd.gains(bd.collect([("e.json", _sweep_file("a", [row]))], {}), ["medusa-k1-base"])
    with pytest.raises(SystemExit, match="PATH=LABEL"):
        bd.parse_labels("koala/default_heads/eagle")


def test_layer_share_fit_and_targets():
    import torch

    from bench.layer_share import fit_line
    from bench.scale import random_target
    a, b, r = fit_line([6, 12, 18, 30], [0.1 + 0.015 * n for n in (6, 12, 18, 30)])
    assert a == pytest.approx(0.1) and b == pytest.approx(0.015) and r < 1e-12
    a, b, r = fit_line([1, 2, 3], [1.0, 3.0, 2.0])            # a residual is reported, not hidden
    assert b == pytest.approx(0.5) and r == pytest.approx(1.0)
    lt = random_target("smollm2-135m", "cpu", torch.float32, n_layers=2)
    cfg = lt.model.config
    assert cfg.n_layers == 2 and len(lt.model.layers) == 2 and cfg.dim == 576
    assert all(float(p.abs().sum()) > 0 for p in lt.model.parameters())
