"""Condition files (conditions/*.json, load_conditions, the token budget) and the LLM-driven
discovery of conditions and of FedMVP's attribute descriptions, against a scripted local chat
server and against servers that misbehave (endless, dripping, hostile answers, redirects)."""
import collections
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import conditions
import data
from baselines.fedmvp import load_attributes
from conditions import attributes as attribute_text
from conditions import discover as discovery
from errors import FedMPTError
from loaders.voc import VOC_CLASSES
from shapes import world as shapes

REPO = Path(__file__).resolve().parents[1]
GOOD = ["colour", "background", "scene type", "spatial layout", "object size"]
PREVIOUS = b'{"conditions": ["kept"], "source": "previous run"}\n'


class ChatServer:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 that plays a scripted list of replies
    and records every request. A reply is an answer text, ("status", code, body) or ("hang",)."""

    def __init__(self):
        self.replies, self.requests = collections.deque(), []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                reply = server.replies.popleft()
                if reply == ("hang",):
                    server.release.wait(10)
                    return
                code, payload = (reply[1], reply[2]) if isinstance(reply, tuple) else (
                    200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}))
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture
def out(tmp_path):
    """An --out file left by an earlier run: a failed discovery must not touch it."""
    path = tmp_path / "conditions.json"
    path.write_bytes(PREVIOUS)
    return path


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    for variable in discovery.API_KEY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def answer(conditions):
    return json.dumps({"conditions": conditions})


def discover(server, out, *extra):
    return discovery.main(["--dataset", "shapes", "--base-url", server.base_url,
                         "--model", "test-model", "--out", str(out), *extra])


def test_discovery_writes_llm_provenance_and_sends_classes_and_key(server, out, shapes_root, monkeypatch):
    monkeypatch.setenv("FEDMPT_LLM_API_KEY", "secret")
    server.replies.append(answer(GOOD))
    assert discover(server, out, "--root", str(shapes_root)) == 0
    written = json.loads(out.read_text())
    assert written["conditions"] == GOOD and written["source"] == "llm:test-model"
    assert written["dataset"] == "shapes" and written["base_url"] == server.base_url
    assert written["cooccurrences"][0][2] > 0  # the training split's most frequent pair
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer secret"
    assert request["body"]["model"] == "test-model" and request["body"]["temperature"] == 0
    prompt = request["body"]["messages"][0]["content"]
    assert prompt == written["prompt"] and all(c in prompt for c in shapes.SHAPES_CLASSES)


def test_fenced_answer_without_key_or_root_is_accepted(server, out):
    server.replies.append(f"```json\n{answer(GOOD)}\n```")
    assert discover(server, out) == 0
    assert json.loads(out.read_text())["conditions"] == GOOD
    assert "Authorization" not in server.requests[0]["headers"]


def test_malformed_json_is_retried_with_the_complaint(server, out):
    server.replies.extend(['{"conditions": ["colour",', answer(GOOD)])
    assert discover(server, out) == 0
    first, second = (r["body"]["messages"] for r in server.requests)
    assert len(first) == 1 and second[:2] == first + [
        {"role": "assistant", "content": '{"conditions": ["colour",'}]
    assert "not valid JSON" in second[2]["content"]


def test_server_error_is_retried(server, out):
    server.replies.extend([("status", 500, "overloaded"), answer(GOOD)])
    assert discover(server, out) == 0
    assert len(server.requests) == 2 and json.loads(out.read_text())["conditions"] == GOOD


@pytest.mark.parametrize("conditions, complaint", [
    (GOOD[:4], "exactly 5 conditions"),
    (GOOD[:4] + ["Circle"], "class name"),
    (GOOD[:4] + ["Background"], "repeat"),
    (GOOD[:4] + ["a very long condition phrase"], "1-4 words"),
])
def test_invalid_answer_fails_after_retries_and_keeps_out(server, out, capsys, conditions, complaint):
    server.replies.extend([answer(conditions)] * 2)
    assert discover(server, out, "--retries", "1") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and complaint in error and answer(conditions) in error
    assert len(server.requests) == 2 and complaint in server.requests[1]["body"]["messages"][-1]["content"]
    assert out.read_bytes() == PREVIOUS


def test_client_error_is_not_retried(server, out, capsys):
    server.replies.append(("status", 401, '{"error": "bad key"}'))
    assert discover(server, out) == 2
    assert "HTTP 401" in capsys.readouterr().err and len(server.requests) == 1
    assert out.read_bytes() == PREVIOUS


def test_silent_server_times_out_in_bounded_time(server, out, capsys):
    server.replies.extend([("hang",)] * 2)
    start = time.time()
    assert discover(server, out, "--timeout", "0.5", "--retries", "1") == 2
    assert time.time() - start < 5
    assert "--timeout 0.5" in capsys.readouterr().err and len(server.requests) == 2
    assert out.read_bytes() == PREVIOUS


@pytest.mark.slow
def test_command_line_exits_2_without_traceback(server, out):
    server.replies.append(answer(["colour"]))
    result = subprocess.run([sys.executable, "-m", "conditions.discover", "--dataset", "shapes",
                             "--base-url", server.base_url, "--model", "m", "--out", str(out),
                             "--retries", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and out.read_bytes() == PREVIOUS


# ---- A server that misbehaves: the client gives nothing away -----------------------------
class HostileServer:
    """A chat-completions server on 127.0.0.1 that answers every POST with `behaviour`, and
    records every request it gets (path, headers)."""

    def __init__(self, behaviour):
        self.requests, server = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append((self.path, dict(self.headers)))
                try:
                    behaviour(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def chat_reply(handler, content, code=200):
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def endless(handler):
    handler.send_response(200)
    handler.end_headers()  # no length: the body runs until the server stops
    for _ in range(200):  # 12.8 MB, more than the client takes
        handler.wfile.write(b"x" * 65536)


def dripping(handler):
    handler.send_response(200)
    handler.end_headers()
    for _ in range(100):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.1)


def ask_hostile(behaviour, tmp_path, *options):
    server = HostileServer(behaviour)
    out = tmp_path / "conditions.json"
    try:
        start = time.monotonic()
        code = discovery.main(["--dataset", "shapes", "--base-url", server.base_url, "--model", "m", "--out", str(out),
                              "--retries", "0", *options])
        return code, time.monotonic() - start, server.requests, out
    finally:
        server.close()


@pytest.mark.parametrize("behaviour, options, message, seconds", [
    (endless, ["--timeout", "30"], "the reply is over 4 MiB", 10),
    (dripping, ["--timeout", "1"], "no whole answer within --timeout 1 s", 4),
    (lambda h: chat_reply(h, "[" * 200_000 + "]" * 200_000), [], "nests deeper than Python's parser goes", 10),
    (lambda h: chat_reply(h, json.dumps({"conditions": [f"c{i}" for i in range(40_000)]})), [],
     "expected exactly 5 conditions, got 40000", 10),
])
def test_hostile_answers_end_in_bounded_time_and_memory(tmp_path, capsys, behaviour, options, message, seconds):
    code, took, _, out = ask_hostile(behaviour, tmp_path, *options)
    error = capsys.readouterr().err
    assert code == 2 and message in error and took < seconds and not out.exists()
    assert len(error) < 10_000  # no answer is echoed whole


def test_an_answer_with_terminal_escapes_is_shown_escaped(tmp_path, capsys):
    code, _, _, _ = ask_hostile(lambda h: chat_reply(h, "\x1b[2J\x1b]0;owned\x07 not json"), tmp_path)
    error = capsys.readouterr().err
    assert code == 2 and "\x1b" not in error and "\x07" not in error and "\\x1b[2J" in error


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(tmp_path, capsys, monkeypatch):
    thief = HostileServer(lambda h: chat_reply(h, json.dumps({"conditions": ["a", "b", "c", "d", "e"]})))

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"{thief.base_url}/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    monkeypatch.setenv("FEDMPT_LLM_API_KEY", "the-secret")
    try:
        code, _, requests, _ = ask_hostile(redirect, tmp_path)
    finally:
        thief.close()
    assert code == 2 and "redirect" in capsys.readouterr().err
    assert requests[0][1].get("Authorization") == "Bearer the-secret" and thief.requests == []


# ---- Condition files ----------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "conditions").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_condition_files_validate_and_say_default(path):
    loaded = conditions.load_conditions(str(path), path.stem)
    assert loaded["dataset"] == path.stem and loaded["source"] == "default"
    shipped = json.loads(path.read_text())
    assert f"exactly {len(loaded['conditions'])} visual conditions" in shipped["prompt"]


def test_shipped_files_cover_every_dataset():
    assert {p.stem for p in (REPO / "conditions").glob("*.json")} == {"voc2007", "coco2014", "nuswide", "shapes", "multiscene", "mlrsnet"}


def test_none_gives_one_generic_condition():
    assert conditions.load_conditions("none", "shapes")["conditions"] == [""]


@pytest.mark.parametrize("content", ['{"conditions": ["pose", "Pose"]}', '{"conditions": ["circle"]}',
                                     '{"conditions": []}', '["pose"]', "not json"])
def test_bad_condition_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FedMPTError, match="bad.json"):
        conditions.load_conditions(str(path), "shapes")


def test_prompt_names_count_as_class_names():
    assert "class name" in conditions.condition_problems(["Potted Plant"], VOC_CLASSES)[0]


def test_token_budget_is_a_parameter():
    long_condition = "supercalifragilistic expialidocious antidisestablishment floccinaucinihilipilification"
    assert conditions.condition_problems([long_condition], VOC_CLASSES) == []
    assert "too long" in conditions.condition_problems([long_condition], VOC_CLASSES, context_length=32)[0]


# ---- --attributes: FedMVP's class descriptions ------------------------------------------------
def descriptions(classes, n=3):
    return {c: [f"a {data.prompt_name(c)} drawn in style {i}" for i in range(n)] for c in classes}


def attribute_answer(classes, n=3):
    return json.dumps({"attributes": descriptions(classes, n)})


def discover_attributes(server, out, *extra, dataset="shapes"):
    return discovery.main(["--attributes", "--dataset", dataset, "--base-url", server.base_url,
                           "--model", "test-model", "--out", str(out), *extra])


def test_attributes_are_written_and_load_for_fedmvp(server, out):
    server.replies.append(f"```json\n{attribute_answer(shapes.SHAPES_CLASSES)}\n```")
    assert discover_attributes(server, out) == 0
    written = json.loads(out.read_text())
    assert written["source"] == "llm:test-model" and written["dataset"] == "shapes" and written["generated"]
    [request] = server.requests
    prompt = request["body"]["messages"][0]["content"]
    assert written["prompts"] == [prompt] and "exactly 3" in prompt
    assert all(f"- {c}" in prompt for c in shapes.SHAPES_CLASSES)
    loaded = load_attributes("shapes", shapes.SHAPES_CLASSES, str(out))
    assert loaded["source"] == "llm:test-model" and loaded["attributes"] == descriptions(shapes.SHAPES_CLASSES)


def test_missing_class_is_sent_back_and_the_corrected_answer_accepted(server, out):
    server.replies.extend([attribute_answer(shapes.SHAPES_CLASSES[:-1]), attribute_answer(shapes.SHAPES_CLASSES)])
    assert discover_attributes(server, out, "--sentences", "3") == 0
    first, second = (r["body"]["messages"] for r in server.requests)
    assert second[:2] == first + [{"role": "assistant", "content": attribute_answer(shapes.SHAPES_CLASSES[:-1])}]
    assert f"classes missing: {shapes.SHAPES_CLASSES[-1]}" in second[2]["content"]
    assert list(json.loads(out.read_text())["attributes"]) == shapes.SHAPES_CLASSES


def test_always_bad_attributes_end_with_exit_2_and_keep_out(server, out, capsys):
    server.replies.extend([attribute_answer(shapes.SHAPES_CLASSES[1:])] * 3)
    assert discover_attributes(server, out, "--retries", "2") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no valid attribute descriptions") and "after 3 request(s)" in error
    assert f"classes missing: {shapes.SHAPES_CLASSES[0]}" in error
    assert len(server.requests) == 3 and out.read_bytes() == PREVIOUS


def test_long_class_lists_are_asked_in_chunks(server, out, capsys):
    parts = [shapes.SHAPES_CLASSES[i:i + 4] for i in (0, 4, 8)]  # 12 classes, at most 5 a request
    server.replies.extend([attribute_answer(parts[0]), attribute_answer(parts[2]), attribute_answer(parts[2])])
    assert discover_attributes(server, out, "--classes-per-request", "5", "--retries", "1") == 2
    assert "for classes 5-8 of 12" in capsys.readouterr().err and out.read_bytes() == PREVIOUS
    server.requests.clear()
    server.replies.extend(attribute_answer(part) for part in parts)
    assert discover_attributes(server, out, "--classes-per-request", "5") == 0
    assert len(server.requests) == 3 and len(json.loads(out.read_text())["prompts"]) == 3
    assert json.loads(out.read_text())["attributes"] == descriptions(shapes.SHAPES_CLASSES)


def test_aerial_dataset_without_data_takes_the_shipped_files_classes(server, out):
    classes = list(json.loads((REPO / "baselines/attributes/multiscene.json").read_text())["attributes"])
    server.replies.append(attribute_answer(classes))
    assert discover_attributes(server, out, "--classes-per-request", "0", dataset="multiscene") == 0
    prompt = server.requests[0]["body"]["messages"][0]["content"]
    assert "from above" in prompt and "- OilFiled (oil field)" in prompt
    assert load_attributes("multiscene", classes, str(out))["attributes"]["OilFiled"][0] == "a oil field drawn in style 0"


@pytest.mark.parametrize("change, complaint", [
    (lambda a: a.update({"tank": ["a tank seen from the side"] * 3}), "not classes of this request: 'tank'"),
    (lambda a: a.update({"Circle": a["circle"]}), "given twice"),
    (lambda a: a["star"].pop(), "'star' has 2 sentences, not exactly 3"),
    (lambda a: a["star"].__setitem__(1, a["star"][0].upper()), "'star' repeats a sentence"),
    (lambda a: a["ring"].__setitem__(0, "ring"), "not a sentence of 3-25 words"),
    (lambda a: a["ring"].__setitem__(0, "a ring " + "x" * 300), "exceeds CLIP's 77 tokens"),
    (lambda a: a.__setitem__("ring", "a ring"), "must map to a list of sentences"),
])
def test_attribute_problems(change, complaint):
    answer = descriptions(shapes.SHAPES_CLASSES)
    assert attribute_text.attribute_problems(answer, shapes.SHAPES_CLASSES, 3) == (answer, [])
    change(answer)
    _, problems = attribute_text.attribute_problems(answer, shapes.SHAPES_CLASSES, 3)
    assert any(complaint in p for p in problems), problems


def test_attribute_keys_may_be_prompt_names():
    answer = {"oil field": ["an oil field seen from above"], "Beach": ["a beach seen from above"]}
    tidy, problems = attribute_text.attribute_problems(answer, ["OilFiled", "Beach"], 1)
    assert problems == [] and list(tidy) == ["OilFiled", "Beach"]


def test_chunks_are_even():
    assert [len(p) for p in attribute_text.chunks(range(81), 20)] == [16, 16, 16, 16, 17]
    assert attribute_text.chunks("abc", 0) == [["a", "b", "c"]]
