"""``viscpm eval llava-bench`` end to end: a tiny random chat model, stand-in images, a small data set
in LLaVA's file layout (English and Chinese), and a real judge process speaking the OpenAI protocol
(tests/evaluation/llava_judge_server.py). The real LLaVA-Bench files are read from ../shared/reference."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image

from viscpm.cli import main
from viscpm.evaluation.judge import SYSTEM_PROMPT, Judge, JudgeSettings, JudgeUnavailable, parse_scores
from viscpm.evaluation.llava_bench import load_bench_set, run_llava_bench


SERVER = Path(__file__).with_name("llava_judge_server.py")
LLAVA_FOLDERS = {"en": "LLaVA_qa90_en", "zh": "translated_LLaVA_qa90"}  # in the reference data's data/
VOCAB = Path(str(resources.files("viscpm") / "assets" / "chat" / "vocab.txt"))  # the packaged 576-token vocab
IMAGES = {"000000000101.jpg": (200, 40, 40), "000000000202.jpg": (40, 60, 210)}
CATEGORIES = ("conv", "detail", "complex")
TEXT = {
    "en": {"question": "What colour is the shape in image {n}?", "answer": "A reference answer about image {n}, {c}.",
           "caption": "A plain {colour} picture number {n}.", "object": "square", "rule": "Rate the two answers ({c})."},
    "zh": {"question": "第{n}张图片里的形状是什么颜色？", "answer": "关于第{n}张图片的参考答案（{c}）。",
           "caption": "第{n}张纯色图片。", "object": "方块", "rule": "请给两个回答打分（{c}）。"},
}


def write_bench(folder: Path, lang: str) -> Path:
    """Two images x three categories in LLaVA's layout (VisCPM's _zh file names for Chinese)."""
    folder.mkdir(parents=True)
    suffix = "_zh" if lang == "zh" else ""
    text = TEXT[lang]
    questions, answers, contexts = [], [], []
    for n, image in enumerate(IMAGES, start=1):
        contexts.append({"id": image[:-4], "image": image, "captions": [text["caption"].format(n=n, colour="red")] * 5,
                         "instances": [{"category": text["object"], "bbox": [0.1, 0.2, 0.5, 0.6]}]})
        for c in CATEGORIES:
            qid = len(questions)
            questions.append({"question_id": qid, "image": image, "text": text["question"].format(n=n), "category": c})
            answers.append({"question_id": qid, "text": text["answer"].format(n=n, c=c), "category": c})
    for name, records in [(f"qa90_questions{suffix}.jsonl", questions), (f"qa90_gpt4_answer{suffix}.jsonl", answers),
                          (f"caps_boxes_coco2014_val_80{suffix}.jsonl", contexts)]:
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    rules = {c: {"role": "Assistant", "prompt": text["rule"].format(c=c)} for c in CATEGORIES}
    (folder / f"rule{suffix}.json").write_text(json.dumps(rules, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random chat model folder, stand-in images (one under the official COCO name) and both data sets."""
    from viscpm.checkpoints import save_folder
    from viscpm.models.beit3 import BEiT3Config
    from viscpm.models.chat import ChatConfig, ChatModel
    from viscpm.models.cpmbee import CPMBeeConfig

    root = tmp_path_factory.mktemp("llava_bench")
    torch.manual_seed(0)
    config = ChatConfig(CPMBeeConfig(vocab_size=576, dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16),
                        BEiT3Config(image_size=32, patch_size=16, dim=32, num_heads=2, ffn_dim=64, num_layers=1),
                        query_num=4)
    save_folder(ChatModel(config), config, root / "model", VOCAB)
    (root / "images").mkdir()
    for number, (name, rgb) in enumerate(IMAGES.items()):
        stored = f"COCO_val2014_{name}" if number == 0 else name  # the official val2014 name is found too
        Image.new("RGB", (48, 40), rgb).save(root / "images" / stored, quality=95)
    return {"model": root / "model", "images": root / "images",
            "en": write_bench(root / "en", "en"), "zh": write_bench(root / "zh", "zh")}


class JudgeProcess:
    """The stand-in judge as a separate process; ``mode`` can be switched between runs."""

    def __init__(self, folder: Path, mode: str, fail_first: int = 0):
        self.mode_file, self.log = folder / "mode.txt", folder / "requests.jsonl"
        self.set_mode(mode)
        self.process = subprocess.Popen([sys.executable, str(SERVER), "--mode-file", str(self.mode_file), "--log",
                                         str(self.log), "--fail-first", str(fail_first)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), f"judge server did not start: {line!r}"
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def set_mode(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def requests(self) -> list[dict]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture()
def start_judge(tmp_path):
    started = []

    def start(mode: str, fail_first: int = 0) -> JudgeProcess:
        folder = tmp_path / f"judge{len(started)}"
        folder.mkdir()
        started.append(JudgeProcess(folder, mode, fail_first))
        return started[-1]

    yield start
    for judge in started:
        judge.stop()


def bench_args(world, judge: JudgeProcess, out: Path, *extra: str, lang: str = "both") -> list[str]:
    return ["eval", "llava-bench", "--model", str(world["model"]), "--lang", lang, "--en-data", str(world["en"]),
            "--zh-data", str(world["zh"]), "--images", str(world["images"]), "--judge-url", judge.url,
            "--judge-model", "rule-judge", "--out", str(out), "--beams", "1", "--max-new-tokens", "4", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_relative(answers: list[dict]) -> dict[str, float]:
    """The stand-in rule (reference 8, model 1 + len(answer) % 9), summarized independently."""
    model = {c: [1 + len(a["text"]) % 9 for a in answers if a["category"] == c] for c in CATEGORIES}
    model["all"] = [s for c in CATEGORIES for s in model[c]]
    return {c: round(100 * (sum(v) / len(v)) / 8, 1) for c, v in model.items()}


@pytest.mark.slow
def test_both_languages_end_to_end_then_resume(world, start_judge, tmp_path, capsys):
    judge = start_judge("rule")
    out = tmp_path / "run"
    assert main(bench_args(world, judge, out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for lang in ("en", "zh"):
        answers = read_jsonl(out / lang / "answers.jsonl")
        assert len(answers) == 6
        assert {c: s["relative"] for c, s in report["scores"][lang].items()} == expected_relative(answers)
        assert report["scores"][lang]["all"]["scored"] == 6 and report["languages"][lang]["unparseable"] == 0
        assert report["languages"][lang]["judge_models_reported"] == ["stand-in-judge-2026-01-01"]
        rules = json.loads((world[lang] / ("rule_zh.json" if lang == "zh" else "rule.json")).read_text(encoding="utf-8"))
        canonical = json.dumps({c: rules[c] for c in CATEGORIES}, ensure_ascii=False, sort_keys=True).encode()
        assert report["languages"][lang]["data"]["sha256"]["rule_text"] == hashlib.sha256(canonical).hexdigest()
    assert report["judge"] == {"url": judge.url, "model": "rule-judge", "temperature": 0.2, "max_tokens": 1024,
                               "attempts": 3, "system_prompt": SYSTEM_PROMPT}
    assert report["model"]["path"] == str(world["model"].resolve())
    # the paper-shaped table, with the judge that made it
    assert "Conversation" in printed and "Complex reasoning" in printed and "Average" in printed
    en_row = next(line for line in printed.splitlines() if line.startswith("EN"))
    assert f"{report['scores']['en']['all']['relative']:.1f}" in en_row and "6/6" in en_row
    assert "judge: rule-judge at " + judge.url in printed and "stand-in-judge-2026-01-01" in printed

    # what the judge saw: LLaVA's layout, reference first, the model's answer second, the category's rule
    requests = judge.requests()
    assert len(requests) == 12
    zh_answers = {a["question_id"]: a["text"] for a in read_jsonl(out / "zh" / "answers.jsonl")}
    body = next(r["body"] for r in requests if "第2张图片里" in r["body"]["messages"][1]["content"]
                and "（detail）" in r["body"]["messages"][1]["content"])
    assert body["model"] == "rule-judge" and body["temperature"] == 0.2
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert body["messages"][1]["content"] == (
        "[Context]\n" + "\n".join(["第2张纯色图片。"] * 5) + "\n\n方块: [0.1, 0.2, 0.5, 0.6]\n\n"
        "[Question]\n第2张图片里的形状是什么颜色？\n\n"
        "[Assistant 1]\n关于第2张图片的参考答案（detail）。\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{zh_answers[4]}\n\n[End of Assistant 2]\n\n"
        "[System]\n请给两个回答打分（detail）。\n\n")

    # a second run does nothing new and prints the same table
    assert main(bench_args(world, judge, out)) == 0
    assert capsys.readouterr().out == printed
    assert len(judge.requests()) == 12 and len(read_jsonl(out / "en" / "answers.jsonl")) == 6

    # an interrupted run (two verdicts lost, the last line torn) asks only for what is missing
    reviews = (out / "en" / "reviews.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "en" / "reviews.jsonl").write_text("".join(reviews[:4]) + reviews[4][:20], encoding="utf-8")
    answers = (out / "zh" / "answers.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "zh" / "answers.jsonl").write_text("".join(answers[:5]), encoding="utf-8")
    assert main(bench_args(world, judge, out)) == 0
    assert len(judge.requests()) == 12 + 2  # the two lost verdicts; zh's re-answered question keeps its verdict
    assert len(read_jsonl(out / "zh" / "answers.jsonl")) == 6
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["scores"]["en"] == report["scores"]["en"]


@pytest.mark.slow
def test_other_settings_are_refused_instead_of_mixed(world, start_judge, tmp_path, capsys):
    judge = start_judge("rule")
    out = tmp_path / "run"
    assert main(bench_args(world, judge, out, "--limit", "1", lang="en")) == 0
    capsys.readouterr()
    assert main(bench_args(world, judge, out, "--limit", "1", "--beams", "2", lang="en")) == 2
    error = capsys.readouterr().err
    assert "other settings (generation differ" in error and "new --out folder" in error


@pytest.mark.slow
def test_unparseable_replies_are_retried_counted_then_judged_again(world, start_judge, tmp_path, capsys):
    judge = start_judge("malformed")
    out = tmp_path / "run"
    assert main(bench_args(world, judge, out, "--judge-attempts", "2", lang="zh")) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["languages"]["zh"]["unparseable"] == 6
    assert report["languages"]["zh"]["unparseable_question_ids"] == list(range(6))
    assert report["scores"]["zh"]["all"] == {"relative": None, "reference": None, "model": None, "scored": 0}
    assert len(judge.requests()) == 12  # two attempts each
    reviews = read_jsonl(out / "zh" / "reviews.jsonl")
    assert all(r["scores"] is None and len(r["replies"]) == 2 for r in reviews)
    zh_row = next(line for line in printed.splitlines() if line.startswith("ZH"))
    assert zh_row.split()[-2:] == ["0/6", "6"]

    # unparseable verdicts are not done: once the judge behaves, a re-run asks again and scores them
    judge.set_mode("rule")
    assert main(bench_args(world, judge, out, "--judge-attempts", "2", lang="zh")) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["languages"]["zh"]["unparseable"] == 0
    assert report["scores"]["zh"]["all"]["relative"] == expected_relative(read_jsonl(out / "zh" / "answers.jsonl"))["all"]


@pytest.mark.slow
def test_flaky_replies_and_server_errors_are_retried(world, start_judge, tmp_path, monkeypatch):
    judge = start_judge("flaky", fail_first=2)
    out = tmp_path / "run"
    monkeypatch.setenv("STAND_IN_JUDGE_KEY", "secret-123")
    assert main(bench_args(world, judge, out, "--limit", "3", "--judge-key-env", "STAND_IN_JUDGE_KEY", lang="en")) == 0
    assert all(r["authorization"] == "Bearer secret-123" for r in judge.requests())
    assert "secret-123" not in (out / "report.json").read_text() + (out / "run.json").read_text()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["languages"]["en"]["unparseable"] == 0 and report["scores"]["en"]["all"]["scored"] == 3
    assert [len(r["replies"]) for r in read_jsonl(out / "en" / "reviews.jsonl")] == [2, 2, 2]
    requests = judge.requests()
    assert [r["failed"] for r in requests[:3]] == [True, True, False]  # the client retried the HTTP 500s
    assert len(requests) == 2 + 6


def test_an_unreachable_judge_keeps_the_answers(world, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(JudgeSettings(f"http://127.0.0.1:{port}/v1", "gone", max_retries=0, timeout=5))
    bench = load_bench_set(world["en"], "en")
    out = tmp_path / "run"
    with pytest.raises(JudgeUnavailable, match="run the same command again to resume"):
        run_llava_bench([bench], world["images"], lambda images, questions: ["an answer"] * len(questions), judge, out,
                        {"model": "stand-in"}, limit=2)
    assert len(read_jsonl(out / "en" / "answers.jsonl")) == 2


def test_missing_images_are_listed_before_the_model_loads(world, tmp_path, capsys):
    empty = tmp_path / "no_images"
    empty.mkdir()
    assert main(["eval", "llava-bench", "--model", str(tmp_path / "never_loaded"), "--lang", "en",
                 "--en-data", str(world["en"]), "--images", str(empty), "--judge-url", "http://127.0.0.1:9/v1",
                 "--judge-model", "j", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "2 of 2 images not in" in error and "COCO_val2014_000000000101.jpg" in error


def test_a_language_without_its_data_folder_is_refused(world, tmp_path, capsys):
    assert main(["eval", "llava-bench", "--lang", "both", "--en-data", str(world["en"]), "--images", str(tmp_path),
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--out", str(tmp_path / "o")]) == 2
    assert "--lang both needs --zh-data" in capsys.readouterr().err


@pytest.mark.parametrize("reply, scores", [
    ("8 7\nAssistant 1 ...", (8.0, 7.0)),
    ("\n  9, 6.5  \nwhy", (9.0, 6.5)),
    ("8，7\n理由", (8.0, 7.0)),
    ("**8 4**\nexplanation", (8.0, 4.0)),
    ("Assistant 1: 8\nAssistant 2: 7", None),
    ("8\n7", None),
    ("8 7 6", None),
    ("11 3", None),
    ("", None),
])
def test_score_line_parsing(reply, scores):
    assert parse_scores(reply) == scores


LLAVA_FILES = ("qa90_questions", "qa90_gpt4_answer", "caps_boxes_coco2014_val_80", "rule")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_real_llava_bench_files_load(reference, lang):
    bench = load_bench_set(reference / "data" / LLAVA_FOLDERS[lang], lang)
    assert len(bench.items) == 90 and len({i.image for i in bench.items}) == 30
    assert [sum(i.category == c for i in bench.items) for c in CATEGORIES] == [30, 30, 30]
    first = bench.items[0]
    assert first.image == "000000441147.jpg" and first.question_id == 0
    prompt = bench.judge_prompt(first, "MODEL ANSWER")
    assert prompt.index(first.reference) < prompt.index("MODEL ANSWER")
    assert prompt.startswith("[Context]\n") and ": [" in prompt  # captions, then "category: [x1, y1, x2, y2]" boxes
    assert bench.rules["conv"]["prompt"] in prompt


@pytest.mark.slow
def test_a_run_on_the_real_files_with_stand_in_images(reference, world, start_judge, tmp_path):
    data = {lang: reference / "data" / folder for lang, folder in LLAVA_FOLDERS.items()}
    images = tmp_path / "coco"
    images.mkdir()
    for item in load_bench_set(data["en"], "en").items[:3]:
        Image.new("RGB", (40, 30), (90, 120, 30)).save(images / item.image)
    judge = start_judge("rule")
    out = tmp_path / "run"
    args = ["eval", "llava-bench", "--model", str(world["model"]), "--en-data", str(data["en"]), "--zh-data",
            str(data["zh"]), "--images", str(images), "--judge-url", judge.url, "--judge-model", "rule-judge",
            "--out", str(out), "--beams", "1", "--max-new-tokens", "3", "--limit", "3"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for lang in ("en", "zh"):
        assert report["scores"][lang]["all"]["scored"] == 3
        assert report["languages"][lang]["data"]["folder"] == str(data[lang])
    contents = [r["body"]["messages"][1]["content"] for r in judge.requests()]
    assert any("two suitcases" in c for c in contents) and any("两个皮箱" in c for c in contents)
