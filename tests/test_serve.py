"Invariants of microlm.serve: the command line, process-group shutdown, the watchdog, and a real vLLM server's lifecycle."
import json, os, signal, subprocess, sys, threading, time

import pytest

from microlm.serve import COMPACT_JSON_ARGS, WATCHDOG, VLLMServer, lora_rank, server_command
from microlm.vllm_offline import make_tiny_hf_model, offline_generate, session_pids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


def wait_gone(sid, seconds=20):
    t = time.monotonic() + seconds
    while session_pids(sid) and time.monotonic() < t: time.sleep(0.2)
    return session_pids(sid)


def test_tiny_model_files(tiny):
    cfg = json.loads((tiny["model"]/"config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32 and cfg["vocab_size"] == 1024
    tok = json.loads((tiny["model"]/"tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert specials == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 3}
    assert json.loads((tiny["model"]/"generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert lora_rank(tiny["lora"]) == 4
    assert make_tiny_hf_model(tiny["model"].parent.parent/"nolora", with_lora=False)["lora"] is None


def test_server_command(tiny):
    cmd = server_command(tiny["model"], served_name="m", host="127.0.0.1", port=1234, api_key="k", max_model_len=64,
                         lora_modules={"a": tiny["lora"], "b": tiny["lora"]}, extra_args=COMPACT_JSON_ARGS)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    val = lambda f: cmd[cmd.index(f) + 1]
    assert (val("--port"), val("--max-model-len"), val("--max-loras"), val("--max-lora-rank")) == ("1234", "64", "2", "8")
    assert "--api-key=k" in cmd
    # a key that starts with "-" (secrets.token_urlsafe draws one in 64) stays the flag's value, not a flag of its own
    dash = server_command(tiny["model"], served_name="m", host="h", port=1, api_key="-x_Y")
    assert "--api-key=-x_Y" in dash and "--api-key" not in dash
    assert f"a={tiny['lora']}" in cmd and "--enable-lora" in cmd and cmd[-2:] == list(COMPACT_JSON_ARGS)
    assert "--enable-lora" not in server_command(tiny["model"], served_name="m", host="h", port=1)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"): lora_rank(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"): VLLMServer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"): VLLMServer(tiny["model"], lora_modules={"x": tmp_path})


def test_watchdog_stops_session_when_parent_dies():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen({[sys.executable, '-c', WATCHDOG, *sleeper]!r}, start_new_session=True); "
                               "print(p.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    sid = int(parent.stdout.readline())
    time.sleep(0.5)
    assert len(session_pids(sid)) == 2
    parent.kill(); parent.wait()
    assert wait_gone(sid) == []


def test_watchdog_relays_exit_code():
    p = subprocess.run([sys.executable, "-c", WATCHDOG, sys.executable, "-c", "raise SystemExit(7)"])
    assert p.returncode == 7


def test_server_lifecycle_and_interrupt(tiny, tmp_path):
    "A real server: starts, answers (base + LoRA), and a KeyboardInterrupt in the block leaves no process behind."
    srv = VLLMServer(tiny["model"], served_name="tiny", lora_modules={"ada": tiny["lora"]}, api_key="secret",
                     log_path=tmp_path/"server.log", startup_timeout=900)
    with pytest.raises(KeyboardInterrupt):
        with srv:
            assert srv.alive() and srv.health() and srv.startup_seconds > 0
            assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
            client = srv.client()
            assert sorted(m.id for m in client.models.list().data) == ["ada", "tiny"]
            r = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
            assert r.usage.completion_tokens > 0
            import openai
            with pytest.raises(openai.AuthenticationError): openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
            assert len(session_pids(srv.pid)) >= 3 and srv.rss() > 100 * 2**20
            raise KeyboardInterrupt
    assert not srv.alive() and session_pids(srv.last_pid) == []
    assert "Application startup complete" in (tmp_path/"server.log").read_text()
    assert srv.stop() is None  # stopping twice is harmless


def test_ctrl_c_during_startup(tiny):
    "A real SIGINT while start() waits for /health: KeyboardInterrupt, and the process group is gone."
    srv = VLLMServer(tiny["model"], startup_timeout=900)
    # A shell that starts a job in the background (CI runners may) makes it ignore SIGINT; Ctrl-C in a
    # terminal is what this test is about, so restore Python's own handler for its duration.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT)); timer.start()
        with pytest.raises(KeyboardInterrupt): srv.start()
        timer.join()
    finally: signal.signal(signal.SIGINT, old)
    assert not srv.alive() and session_pids(srv.last_pid) == []


def test_bad_flag_fails_fast_with_log(tiny):
    srv = VLLMServer(tiny["model"], extra_args=["--no-such-flag"], startup_timeout=900)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no-such-flag"): srv.start()
    assert time.monotonic() - t0 < 300 and session_pids(srv.last_pid) == []


def test_startup_timeout(tiny):
    srv = VLLMServer(tiny["model"], startup_timeout=2)
    with pytest.raises(TimeoutError, match="not healthy"): srv.start()
    assert session_pids(srv.last_pid) == []


@pytest.mark.slow
def test_qk_norm_model_served_as_qwen3_equals_own_and_transformers(tiny, tmp_path):
    "The parity chain for QK-norm: own generate == transformers' Qwen3 == vLLM's Qwen3, greedy, token for token."
    import torch
    from dataclasses import replace
    from microlm.config import SMOKE
    from microlm.export import export_hf, hf_greedy, load_hf
    from microlm.generate import default_stop_ids, generate
    from microlm.model import MicroLM
    from microlm.tokenizer import load_tokenizer
    torch.manual_seed(0)
    own = MicroLM(replace(SMOKE.model, vocab_size=1024, qk_norm=True)).eval()
    with torch.no_grad():
        for p in own.parameters():
            p.mul_(5) if p.dim() == 2 else p.uniform_(0.5, 1.5)  # peaked logits and gains that are not ones
    out = export_hf(own, tiny["model"], tmp_path/"qwen3")
    assert json.loads((out/"config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300, 17]]
    ours = [g.ids for g in generate(own, prompts, 12, stop_token_ids=default_stop_ids(load_tokenizer(out)))]
    assert sum(map(len, ours)) > 2
    hf, _ = load_hf(out)
    assert hf_greedy(hf, prompts, 12) == ours
    served = offline_generate(out, prompts, max_tokens=12, ignore_eos=True)["outputs"]  # ours ends at a stop token
    assert [o["token_ids"][:len(g)] for o, g in zip(served, ours)] == ours
