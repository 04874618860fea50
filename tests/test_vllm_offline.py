"microlm.vllm_offline: the environment of a vLLM process, and vLLM's offline engine in a session of its own."
import subprocess, sys, threading, time
from pathlib import Path

import pytest

from microlm.inference import vllm_decode
from microlm.vllm_offline import (VLLM_OFFLINE, has_cuda, make_tiny_hf_model, offline_generate, server_env, session_pids,
                                  stop_process_group)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), with_lora=False)


def test_server_env():
    env = server_env(3, base={"PATH": "/bin"})
    assert env["PATH"] == "/bin" and env["TOKENIZERS_PARALLELISM"] == "false" and env["HF_HUB_OFFLINE"] == "1"
    assert env.get("VLLM_CPU_KVCACHE_SPACE") == (None if has_cuda() else "3")
    assert server_env(3, base={"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"  # the caller's setting wins


def test_stop_process_group_kills_the_tree():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(1.0)
    assert len(session_pids(p.pid)) == 2
    res = stop_process_group(p.pid, grace=2)  # the grandchild ignores SIGTERM: needs SIGKILL
    p.wait()
    assert res["killed"] == 1 and res["survivors"] == [] and session_pids(p.pid) == []


def test_a_prompt_that_fills_the_context_is_refused_before_vllm_starts(tiny):
    with pytest.raises(ValueError, match="prompt 1 has 256 tokens: no room for an answer in the context of 256"):
        offline_generate(tiny["model"], [[5, 6], list(range(5, 261))])


@pytest.mark.slow
def test_offline_generate_matches_transformers(tiny):
    import torch  # here: only this test needs transformers' model
    from transformers import AutoModelForCausalLM
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    res = offline_generate(tiny["model"], prompts, max_tokens=8, ignore_eos=True)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    for p, o in zip(prompts, res["outputs"]):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
        assert len(o["token_ids"]) == 8 and o["token_ids"][:len(ref)] == ref
    assert res["seconds"] > 0 and res["metrics"] == {}
    long = offline_generate(tiny["model"], [list(range(5, 250))], max_tokens=32, ignore_eos=True)["outputs"]
    assert len(long[0]["token_ids"]) == 256 - 245  # cut where the prompt leaves less room than asked


@pytest.mark.slow
def test_vllm_decode_with_its_speculation_gives_the_same_tokens(tiny):
    "One prompt at a time, plain and with vLLM's n-gram speculation: the same tokens, and drafts that were accepted."
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    plain = vllm_decode(tiny["model"], prompts, max_tokens=24)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    spec = vllm_decode(tiny["model"], prompts, max_tokens=24, speculative=ngram)
    assert spec["ids"] == plain["ids"] and plain["tokens"] == sum(map(len, plain["ids"])) > 0
    assert plain["engine"] == "vllm" and spec["engine"] == "vllm + ngram"
    assert plain["acceptance"] is None and 0 < spec["acceptance"] <= 1, spec["metrics"]


def test_a_timeout_ends_the_whole_session(tiny):
    "Past its timeout the offline engine's session is killed, whatever it had started by then: no process is left."
    seen, done = [], threading.Event()

    def watch():  # the session's leader is the process running VLLM_OFFLINE
        while not (seen or done.is_set()):
            for d in Path("/proc").iterdir():
                try:
                    if d.name.isdigit() and VLLM_OFFLINE.encode()[:40] in (d / "cmdline").read_bytes():
                        seen.append(int(d.name))
                        return
                except OSError:
                    pass
            done.wait(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            offline_generate(tiny["model"], [[5, 6, 7]], max_tokens=8, timeout=15)
    finally:
        done.set()
        t.join(timeout=5)
    assert seen and session_pids(seen[0]) == []
