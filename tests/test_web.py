"""The chat page (19a_web) end to end: headless Chromium drives the real page, served by `microlm web --run`
on the smoke run, against the real vLLM server it starts (`--models own_base own_lora`: the base with its LoRA
adapter, so that the page has two models to switch between). One vLLM server for the module; the tests that
slow it down or break it (stop, servers that die, shutdown) come last, in file order.

Chromium is Debian's (`tools/setup.sh` installs it where apt is available; elsewhere set MICROLM_CHROMIUM),
driven by Playwright's Python API. Screenshots go to nbs/results/web/, which 19a_web shows."""

import contextlib, json, os, re, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

import httpx
import pytest

from microlm.vllm_offline import session_pids
from microlm.tasks import SCHEMAS, schema_errors

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "nbs" / "results" / "web"
# Chromium must not try to reach Google (no network here) nor need a sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
INJECTION = '<script>alert("script")</script><img src=x onerror="window.pwned=1;alert(2)">'


def chromium() -> str:
    exe = os.environ.get("MICROLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail(
            "no Chromium found: tools/setup.sh installs Debian's `chromium` where apt is available; "
            "elsewhere install Chromium and set MICROLM_CHROMIUM=/path/to/it"
        )
    return exe


class WebProcess:
    "`microlm web ARGS` in its own session; reads its output for the page's URL and the vLLM servers it started."

    def __init__(self, *args: str, timeout: float = 900):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from microlm.pipeline import main; raise SystemExit(main())", "web", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=ROOT,
        )
        self.lines, self.url, self.vllm = [], None, {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("microlm web did not start:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if m := re.search(r"vLLM (\S+) ready at (\S+) \(pid (\d+)", line):
                self.vllm[m[1]] = {"base_url": m[2], "url": m[2].removesuffix("/v1"), "pid": int(m[3])}
            if m := re.search(r"chat at (http://\S+/)", line):
                self.url = m[1]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def web(smoke_run):
    "`microlm web` on the smoke run's base model and LoRA adapter: it starts their vLLM server and serves the page."
    w = WebProcess("--run", str(smoke_run.root), "--models", "own_base", "own_lora")
    yield w
    w.stop()
    for v in w.vllm.values():  # whatever a failed test left: never an orphan
        with contextlib.suppress(ProcessLookupError):
            os.killpg(v["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def vllm(web):
    "The own model's vLLM server as `microlm web` started it: URLs, pid, and the API key only the proxy knows."
    v = dict(web.vllm["own_base"])
    argv = lambda p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
    api = next(p for p in session_pids(v["pid"]) if argv(p)[1:3] == [b"-m", b"vllm.entrypoints.openai.api_server"])
    cmd = Path(f"/proc/{api}/cmdline").read_text().split("\0")
    return {**v, "api_pid": api, "key": next(a.removeprefix("--api-key=") for a in cmd if a.startswith("--api-key="))}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # here: a test dependency, not the package's

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url, width=1000, height=800):
    "A fresh page on `url`, ready (config loaded); page errors and dialogs are collected in `page.problems`."
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page


@pytest.fixture
def page(browser, web):
    p = open_page(browser, web.url)
    p.web_log = lambda: web.lines[-30:]  # for the messages of failed asserts
    yield p
    p.context.close()


def settings(page, **values):
    "Open the settings and fill them (`json` and `model` are selects)."
    if page.locator("#settings").get_attribute("open") is None:
        page.click("#settings summary")
    for k, v in values.items():
        if k in ("json", "model"):
            page.select_option(f"#{k}", v)
        else:
            page.fill(f"#{k}", str(v))


def send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def reply(page, n: int, status: str | None = "done", timeout: float = 60_000) -> dict:
    "Turn `n`'s reply once it has finished (`status`), as the page shows it."
    sel = f"#log .turn:nth-child({n}) .msg.assistant"
    page.wait_for_selector(f"{sel}:not([data-status='streaming'])", timeout=timeout)
    msg = page.locator(sel)
    out = {
        "status": msg.get_attribute("data-status"),
        "text": msg.locator(".text").text_content(),
        "stats": msg.locator(".stats").text_content(),
        "chunks": int(msg.get_attribute("data-chunks")),
        "model": msg.get_attribute("data-model"),
        "prompt_tokens": msg.get_attribute("data-prompt-tokens"),
        "messages_sent": msg.get_attribute("data-messages-sent"),
        "error": msg.locator(".error").text_content() if msg.locator(".error").count() else None,
    }
    if status is not None:
        assert out["status"] == status, out
    return out


def shot(page, name: str):
    "Save a screenshot for 19a_web (settings folded away, so the conversation shows)."
    if page.locator("#settings").get_attribute("open") is not None:
        page.click("#settings summary")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def metrics(url: str) -> dict:
    "vLLM's Prometheus counters summed over labels: {name or name{finished_reason}: value}."
    out = {}
    for name, labels, value in re.findall(r"^(vllm:\w+)(\{[^}]*\})? (\S+)$", httpx.get(url + "/metrics").text, re.M):
        reason = re.search(r'finished_reason="(\w+)"', labels)
        key = f"{name}{{{reason[1]}}}" if reason else name
        out[key] = out.get(key, 0) + float(value)
    return out


# the pacing loop of `slowed`, in a process of its own: no thread of the test process (which waits on the browser and
# holds the GIL for stretches) can delay the next SIGSTOP and hand the engine free time
PACER = r"""
import os, signal, sys, time
run, pause, pids = float(sys.argv[1]), float(sys.argv[2]), [int(p) for p in sys.argv[3:]]

def signal_all(sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass

def stop(*_):
    signal_all(signal.SIGCONT)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
try:  # wake on time however busy the machine is: a late SIGSTOP hands the engine whole replies at full speed
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
except OSError:  # not allowed here (no CAP_SYS_NICE): the normal scheduler, usually on time on an idle machine
    pass
signal_all(signal.SIGSTOP)
print("stopped", flush=True)  # the test goes on only from here: no free start for the engine
while True:
    time.sleep(pause)
    signal_all(signal.SIGCONT)
    time.sleep(run)
    signal_all(signal.SIGSTOP)
"""


@contextlib.contextmanager
def slowed(vllm_pid: int, run: float = 0.01, pause: float = 0.2):
    """Make the vLLM engine slow, as a real model on a busy machine is: its processes run `run` seconds in every
    `run + pause` (SIGSTOP/SIGCONT from a pacing process of its own). The smoke model otherwise writes a whole reply
    in a fraction of a second, too fast to stop, or to kill a server, in the middle of one. The API server keeps its
    speed. The engine keeps its CPU priority and gets windows of 10 ms: at nice 19, in windows of 1 ms, a busy
    machine can leave it no CPU at all, and a reply's first token then takes more than a minute."""
    engine = [p for p in session_pids(vllm_pid) if Path(f"/proc/{p}/comm").read_text().startswith("VLLM::")]
    assert engine, "no vLLM engine processes found"
    pacer = subprocess.Popen([sys.executable, "-c", PACER, str(run), str(pause), *map(str, engine)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert pacer.stdout.readline().strip() == "stopped", "the pacing process did not start"
        yield engine
    finally:
        pacer.terminate()
        pacer.wait(timeout=10)
        for p in engine:  # whatever state the pacer was in when it ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def first_text(page, n: int):
    "Wait until turn `n`'s reply shows some text while it is still being written (fail at once if it ended)."
    page.wait_for_function(
        f"""() => {{ const m = document.querySelector('#log .turn:nth-child({n}) .msg.assistant');
        return m && (m.dataset.status !== 'streaming' || m.querySelector('.text').textContent.length > 0) }}""",
        timeout=60_000,
        polling=20,
    )
    state = (
        reply(page, n, status=None, timeout=1000)
        if page.locator(f"#log .turn:nth-child({n}) .msg.assistant:not([data-status='streaming'])").count()
        else None
    )
    assert state is None, (state, page.problems, getattr(page, "web_log", lambda: None)())


def test_reply_streams_and_second_turn_uses_the_first(page, vllm):
    "Enter sends, Shift+Enter breaks the line; the reply arrives in parts; the next turn is sent with the first."
    settings(page, max_tokens=24, extra=json.dumps({"ignore_eos": True}))
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const t = document.querySelector('#log .msg.assistant .text');
            if (t) window.lengths.push(t.textContent.length) })
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}) }""")
    page.fill("#input", "Hello there,")
    page.press("#input", "Shift+Enter")
    page.type("#input", "who are you?")
    assert page.input_value("#input") == "Hello there,\nwho are you?"  # Shift+Enter broke the line, sent nothing
    assert page.locator("#log .turn").count() == 0
    with slowed(vllm["pid"], pause=0.05):  # at full speed 24 tokens can all land within one frame of the page
        page.press("#input", "Enter")
        one = reply(page, 1)
    assert page.locator("#log .msg.user .text").text_content() == "Hello there,\nwho are you?"
    grew = sorted(set(page.evaluate("window.lengths")) - {0})
    assert one["chunks"] > 1 and len(grew) > 1 and grew[-1] == len(one["text"]), (one, grew)  # it appeared in parts
    assert one["model"] == "own_base" and one["messages_sent"] == "1"
    assert re.search(r"s to first token · \d+ tok/s · 24 tokens · cut at max tokens", one["stats"]), one["stats"]
    send(page, "Tell me more.")
    two = reply(page, 2)
    # the second prompt is exactly the first turn (as the page shows it) and the new message, through vLLM's template
    turns = [
        {"role": "user", "content": "Hello there,\nwho are you?"},
        {"role": "assistant", "content": one["text"]},
        {"role": "user", "content": "Tell me more."},
    ]
    count = lambda msgs: httpx.post(
        vllm["url"] + "/tokenize", json={"model": "own_base", "messages": msgs, "add_generation_prompt": True}
    ).json()["count"]
    assert two["messages_sent"] == "3" and int(two["prompt_tokens"]) == count(turns) > count(turns[2:])
    assert "prompt" in page.text_content("#context") and not page.locator("#log .turn.outside").count()
    shot(page, "chat")
    assert page.problems == []


def test_context_limit_is_visible(page):
    "Old turns that no longer fit are marked and not sent; a message too long for the context is an error."
    # replies of 64 tokens, half of the smoke model's 128-token context
    settings(page, max_tokens=64, extra=json.dumps({"ignore_eos": True, "seed": 2}))
    for i in range(3):
        send(page, f"Question number {i}: what happens next in the play?")
        r = reply(page, i + 1)
    assert int(r["messages_sent"]) < 5 and page.locator("#log .turn.outside").count() >= 1
    assert int(page.locator("#context").get_attribute("data-dropped")) >= 1
    assert re.search(r"\d+ earlier turns? no longer fit", page.text_content("#context"))
    assert page.locator("#log .turn:nth-child(3).outside").count() == 0  # the newest turn is never dropped
    page.evaluate("[...document.querySelectorAll('#log .turn.outside')].pop().scrollIntoView({block: 'center'})")
    shot(page, "context")
    send(page, "word " * 200)
    err = reply(page, 4, status="error")
    assert re.search(r"needs \d+ prompt tokens .* but only 64 fit", err["error"]), err
    send(page, "Short again.")
    assert reply(page, 5)["status"] == "done"  # the page goes on after an error


def test_switch_between_served_models(page):
    "The picker lists what vLLM serves; each reply comes from the model picked (vLLM names it in its answer)."
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
    assert options == [["own_base", "own_base"], ["own_lora", "own_lora (adapter on own_base)"]]
    # sampled with one seed from each model's own distribution (greedy, both smoke models write newlines)
    settings(page, temperature=1, max_tokens=32, extra=json.dumps({"ignore_eos": True, "seed": 0}))
    send(page, "Once upon a time")
    base = reply(page, 1)
    page.click("#new")
    assert page.locator("#log .turn").count() == 0
    page.select_option("#model", "own_lora")
    send(page, "Once upon a time")
    lora = reply(page, 1)
    assert (base["model"], lora["model"]) == ("own_base", "own_lora")
    assert base["text"] != lora["text"]  # same prompt, same seed: the adapter changes the answer
    assert page.problems == []


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_json_answer_parses(page, kind):
    "JSON mode sends the task's schema as `response_format`: the answer parses and fits the schema."
    settings(page, model="own_lora", json=kind, max_tokens=100)
    send(page, "Answer as JSON.")
    r = reply(page, 1)
    obj = page.evaluate("t => JSON.parse(t)", r["text"])  # parses in the page itself
    assert schema_errors(obj, SCHEMAS[kind]) == [] and r["stats"].endswith("finished")
    assert page.text_content("#log .json.ok") == f"valid JSON for the {kind} schema"
    if kind == "format":
        shot(page, "json")


def test_model_output_is_text_not_html(page):
    "A reply holding <script> and <img onerror> is shown as those characters: nothing runs, nothing is inserted."
    regex = re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\1", INJECTION)  # the model may write exactly INJECTION, nothing else
    settings(page, max_tokens=100, extra=json.dumps({"structured_outputs": {"regex": regex}}))
    send(page, "Say something dangerous.")
    r = reply(page, 1)
    assert r["text"] == INJECTION
    assert page.locator("#log script, #log img").count() == 0
    assert page.evaluate("window.pwned") is None and page.problems == []  # no alert dialog, no handler ran
    shot(page, "injection")


def test_narrow_screen(browser, web):
    "At 390 px wide nothing overflows sideways and the composer stays on screen."
    page = open_page(browser, web.url, width=390, height=844)
    settings(page, max_tokens=32)
    page.click("#settings summary")  # closed again
    send(page, "A long question whose words wrap: " + "supercalifragilistic" * 4)
    reply(page, 1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#send").bounding_box()
    assert box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    shot(page, "mobile")
    page.context.close()


def test_api_key_stays_on_the_server(web, vllm):
    "The deployment has a key (vLLM refuses requests without it); the page and its API never show it."
    assert httpx.get(vllm["base_url"] + "/models").status_code == 401
    assert (
        httpx.get(vllm["base_url"] + "/models", headers={"Authorization": f"Bearer {vllm['key']}"}).status_code == 200
    )
    body = {"model": "own_base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    seen = [
        httpx.get(web.url + p).text for p in ("", "static/chat.js", "static/index.html", "api/config", "api/health")
    ]
    seen.append(httpx.post(web.url + "api/chat", json=body).text)
    assert '"type": "done"' in seen[-1] and not any(vllm["key"] in s for s in seen)


def test_wrong_api_key_is_reported(browser, vllm):
    "Attached with a wrong key, the page says so instead of showing an empty model list."
    from microlm.web import OpenAIBackend, WebServer, make_app

    with WebServer(make_app([OpenAIBackend(vllm["base_url"], "not-the-key")])) as srv:
        page = open_page_unready(browser, srv.url)
        page.wait_for_selector("#log .notice")
        assert "HTTP 401" in page.text_content("#log .notice") and "--api-key" in page.text_content("#log .notice")
        page.context.close()


def open_page_unready(browser, url):
    page = browser.new_context(viewport={"width": 1000, "height": 600}).new_page()
    page.goto(url)
    return page


def test_refuses_a_non_loopback_bind_unless_asked(vllm, capsys):
    "`--host 0.0.0.0` is refused before anything starts; with --allow-remote it serves."
    from microlm.web import OpenAIBackend, WebServer, make_app, web_main

    assert web_main(["--host", "0.0.0.0", "--url", vllm["base_url"]]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve the chat on '0.0.0.0'" in err and "--allow-remote" in err

    # asked: it binds every interface and answers any Host (no API key here: nothing worth taking is exposed)
    with WebServer(make_app([OpenAIBackend(vllm["base_url"])], allow_remote=True), "0.0.0.0", allow_remote=True) as srv:
        assert srv.sock.getsockname()[0] == "0.0.0.0"
        assert httpx.get(srv.url + "/api/health", headers={"Host": "chat.example"}).json()["ok"] is True


def test_models_are_checked_before_anything_starts(smoke_run, tmp_path, capsys):
    "`--models` with `--url` is refused, and a name the run never exported is named in the error."
    from microlm.web import local_models, web_main

    assert web_main(["--run", str(tmp_path), "--url", "http://127.0.0.1:9/v1", "--models", "own_base"]) == 1
    assert "--models picks what to start" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"no exported \['own_nope'\]"):
        local_models(smoke_run, ["own_sft", "own_nope"])
    assert list(local_models(smoke_run, ["own_sft"])) == ["own_sft"]


def test_local_mode_without_vllm(browser, smoke_run):
    "`microlm web --local`: the own engine in the web server, no vLLM; JSON mode is off; Ctrl-C stops it."
    w = WebProcess("--local", "--run", str(smoke_run.root), timeout=300)
    try:
        page = open_page(browser, w.url)
        assert "own_sft" in page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert page.is_disabled("#json")
        settings(page, model="own_sft", max_tokens=24, temperature=0)
        send(page, "Hello")
        r = reply(page, 1)
        assert r["chunks"] > 1 and r["model"] == "own_sft"
        page.context.close()
    finally:
        code = w.stop(signal.SIGINT)
    assert code == 0 and session_pids(w.proc.pid) == []


def test_stop_mid_stream_cancels_the_upstream_request(page, web, vllm):
    "Stop in the middle of a reply: the text so far stays, and vLLM's request is cancelled, not left running."
    settings(page, max_tokens=100, extra=json.dumps({"ignore_eos": True}))  # a reply is 100 tokens unless stopped
    before, stats0 = metrics(vllm["url"]), httpx.get(web.url + "api/stats").json()
    with slowed(vllm["pid"]):
        send(page, "Tell me a long story.")
        first_text(page, 1)
        visible = page.is_visible("#stop") and not page.is_visible("#send")
        assert visible, reply(page, 1, status=None)  # Stop is offered while the reply is written
        page.click("#stop")
        r = reply(page, 1, status="stopped")
    assert r["text"] and "stopped by you" in r["stats"]
    for _ in range(100):  # the engine runs at full speed again: let it finish whatever it still had
        after = metrics(vllm["url"])
        if after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:request_success_total{length}"] == before["vllm:request_success_total{length}"]  # never ran out
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 100
    stats = httpx.get(web.url + "api/stats").json()
    assert stats["cancelled"] == stats0["cancelled"] + 1 and stats["active"] == 0
    shot(page, "stop")
    settings(page, extra="", max_tokens=8)
    send(page, "Go on.")
    assert reply(page, 2)["messages_sent"] == "3"  # the stopped reply's text is part of the conversation


def test_attached_web_server_dies_mid_reply(browser, vllm):
    "`microlm web --url` (attached, with the key) streams a reply; killed in the middle, the page says so."
    w = WebProcess("--url", vllm["base_url"], f"--api-key={vllm['key']}", timeout=120)
    try:
        page = open_page(browser, w.url)
        settings(page, max_tokens=100, extra=json.dumps({"ignore_eos": True}))
        with slowed(vllm["pid"]):
            send(page, "Hello")
            first_text(page, 1)
            os.kill(w.proc.pid, signal.SIGKILL)
            r = reply(page, 1, status="error", timeout=30_000)
        assert "lost the connection to the microlm web server" in r["error"] or "closed the connection" in r["error"]
        page.wait_for_selector("#health[data-ok='0']")
        page.context.close()
    finally:
        w.stop()
    assert session_pids(w.proc.pid) == []


def test_model_server_dies_mid_reply(page, vllm):
    "The vLLM server process dies in the middle of a reply: an error in the page, not a hang; so does the next message."
    settings(page, max_tokens=100, extra=json.dumps({"ignore_eos": True}))
    with slowed(vllm["pid"]):
        send(page, "Hello")
        first_text(page, 1)
        os.kill(vllm["api_pid"], signal.SIGKILL)
        r = reply(page, 1, status="error", timeout=30_000)
    assert r["text"] and "lost the connection to the model server" in r["error"], r
    page.wait_for_selector("#health[data-ok='0']")
    send(page, "Are you there?")
    r2 = reply(page, 2, status="error", timeout=30_000)
    assert "model server" in r2["error"]
    shot(page, "server-died")


def test_shutdown_leaves_no_process(web, vllm):
    "SIGTERM stops `microlm web` and every process of the deployment it started, even one left half dead."
    assert web.proc.poll() is None
    assert web.stop(signal.SIGTERM) == 0 and "microlm web: stopped" in web.lines
    assert session_pids(web.proc.pid) == [] and session_pids(vllm["pid"]) == []
