"""The training path on the real SmolLM2-135M-Instruct tokenizer, data and weights (CPU, slow)."""
import json

import numpy as np
import pytest
import torch

from koala.heads import load_head
from train.data import ShardData, load_sharegpt, prepare, recover_records, sharegpt_path, tokenize_conversation

pytestmark = pytest.mark.slow


def test_sharegpt_recovery_counts():
    raw = sharegpt_path().read_bytes().decode("utf-8", errors="ignore")
    assert 17_500 <= len(recover_records(raw)) <= 17_800           # 17,671 complete records
    convs = load_sharegpt()
    assert 17_000 <= len(convs) <= 17_671
    assert all(c["messages"][0]["role"] in ("user", "system") for c in convs[:500])


def test_assistant_mask_on_chat_template(smollm2):
    tok = smollm2.tokenizer
    msgs = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Eleven."}]
    ids, mask = tokenize_conversation(tok, msgs, 512)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    ids, mask = np.array(ids), np.array(mask, dtype=bool)
    assert tok.decode(ids[mask]) == "Seven is prime.<|im_end|>\nEleven.<|im_end|>\n"
    short, smask = tokenize_conversation(tok, msgs, 20)
    assert len(short) == 20 and short == ids[:20].tolist()


def test_prepare_then_train_cli_then_load(smollm2, tmp_path):
    convs = load_sharegpt()[:40]
    info = prepare(smollm2.tokenizer, convs, tmp_path / "data", max_len=192, held_out=4)
    assert info["eval"]["sequences"] >= 2 and info["train"]["sequences"] >= 20  # held out: min(4, n // 10)
    d = ShardData(tmp_path / "data", "train", batch_size=2)
    assert d.batch(0).tokens.shape[0] == 2 and d.batch(0).mask.any()
    # a second prepare reuses the Arrow cache and writes the same shards
    prepare(smollm2.tokenizer, convs, tmp_path / "data2", max_len=192, held_out=4, cache_dir=tmp_path / "data" / "arrow")
    assert np.array_equal(np.load(tmp_path / "data" / "train.tokens.npy"), np.load(tmp_path / "data2" / "train.tokens.npy"))
    from train.__main__ import main
    rc = main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--kind", "eagle", "--layers", "1",
               "--adversarial", "--lam", "0.1", "--steps", "2", "--batch-size", "2", "--max-len", "64",
               "--eval-batches", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["final_eval"]["eval/top1"]) == 3
    head = load_head(tmp_path / "run" / "head", smollm2)
    assert head.config.kind == "eagle" and head.config.layers == 1


def test_ablation_cli_table_and_skip_finished(tmp_path):
    """train.ablation trains the named heads, writes its table where --table says with the
    concurrency it was told, and a second invocation skips the finished heads (no re-stamp)."""
    from tests.test_train import make_data
    from train.ablation import main
    data = make_data(tmp_path / "data", n_train=8, n_eval=2)
    args = ["--data", data, "--out", str(tmp_path / "abl"), "--steps", "2", "--batch-size", "2", "--max-len", "32",
            "--ckpt-every", "1000", "--eval-every", "1000", "--no-progress", "--only", "medusa-k1-base,eagle-k1-adv"]
    main(args + ["--table", str(tmp_path / "t1.json"), "--concurrent", "2"])
    t1 = json.loads((tmp_path / "t1.json").read_text())
    assert set(t1) == {"medusa-k1-base", "eagle-k1-adv"}
    for r in t1.values():
        assert r["status"] == "finished" and r["step"] == 2 and r["concurrent_trainings"] == 2
    assert len(t1["medusa-k1-base"]["final_eval"]["eval/top1"]) == 4
    main(args + ["--lr", "1e-4"])                  # default table path, both already finished
    t2 = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(t2) == set(t1) and all("concurrent_trainings" not in r for r in t2.values())
    assert t2["eagle-k1-adv"]["train_seconds"] == t1["eagle-k1-adv"]["train_seconds"]
    assert all(r["lr"] == 5e-4 and r["disc_input"] == "logprob" for r in t2.values())   # their own settings
    # a variant recipe lands beside them under its tag, with its settings recorded
    main(args[:-1] + ["eagle-k1-adv", "--tag=-p", "--disc-input", "prob", "--table", str(tmp_path / "t3.json")])
    t3 = json.loads((tmp_path / "t3.json").read_text())
    assert set(t3) == {"eagle-k1-adv-p"} and t3["eagle-k1-adv-p"]["disc_input"] == "prob"
    assert (tmp_path / "abl" / "eagle-k1-adv-p" / "head").is_dir()


def test_ablation_deeper_heads_by_name(tmp_path, smollm2):
    """--only also trains heads deeper than the paper's K = 1..3 (here an EAGLE head of 4 layers),
    and a name that is no head fails before anything loads, saying what a name looks like."""
    from tests.test_train import make_data
    from train.ablation import main, parse_name
    assert parse_name("eagle-k5-adv") == ("eagle", 5, True)
    for bad in ("eagle-k0-adv", "eagle-k9-base", "gpt-k2-adv", "eagle-k2"):
        with pytest.raises(SystemExit, match="not a head name"):
            parse_name(bad)
    with pytest.raises(SystemExit, match="not a head name"):
        main(["--data", str(tmp_path / "absent"), "--only", "eagle-k2-adv,medusa-k12-base"])
    data = make_data(tmp_path / "data", n_train=8, n_eval=2)
    main(["--data", data, "--out", str(tmp_path / "abl"), "--steps", "2", "--batch-size", "2", "--max-len", "32",
          "--ckpt-every", "1000", "--eval-every", "1000", "--no-progress", "--only", "eagle-k4-base"])
    t = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(t) == {"eagle-k4-base"} and t["eagle-k4-base"]["status"] == "finished"
    head = load_head(tmp_path / "abl" / "eagle-k4-base" / "head", smollm2)
    assert head.config.kind == "eagle" and head.config.layers == 4
