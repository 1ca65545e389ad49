"""The journal: durable appends, skipping what is done, surviving a torn last line."""

import json

from lepton_hpc.scheduler.journal import Journal
from lepton_hpc.scheduler.tasks import Task, TaskResult


def result(tid, status="ok", **kw):
    return TaskResult(tid, status, value={"v": tid}, attempts=1, workers=[1], **kw)


def test_done_tasks_with_the_same_payload_are_read_back(tmp_path):
    tasks = [Task("a", {"x": 1}), Task("b", {"x": 2}), Task("c", {"x": 3})]
    j = Journal(tmp_path / "sub" / "journal.jsonl")
    j.append(result("a"), tasks[0].key)
    j.append(result("b", "failed", error="boom"), tasks[1].key)
    j.close()
    done = Journal(j.path).finished(tasks)
    assert list(done) == ["a"]  # failed and missing tasks run again
    assert done["a"].from_journal and done["a"].value == {"v": "a"}


def test_a_changed_payload_is_not_skipped(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    j.append(result("a"), Task("a", {"lr": 0.1}).key)
    j.close()
    assert Journal(j.path).finished([Task("a", {"lr": 0.2})]) == {}


def test_the_last_record_of_a_task_wins(tmp_path):
    task = Task("a", 1)
    j = Journal(tmp_path / "journal.jsonl")
    j.append(result("a", "failed"), task.key)
    j.append(result("a"), task.key)
    j.close()
    assert Journal(j.path).finished([task])["a"].ok


def test_a_torn_last_line_is_ignored_and_the_next_append_starts_a_new_line(tmp_path):
    tasks = [Task("a", 1), Task("b", 2)]
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.append(result("a"), tasks[0].key)
    j.close()
    with path.open("a") as fh:
        fh.write('{"id": "b", "status": "o')  # killed in the middle of a write
    assert list(Journal(path).finished(tasks)) == ["a"]
    j = Journal(path)
    j.append(result("b"), tasks[1].key)
    j.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["id"] == "b"
    assert list(Journal(path).finished(tasks)) == ["a", "b"]


def test_task_keys_depend_on_the_payload_only():
    assert Task("a", {"x": 1, "y": [1, 2]}).key == Task("b", {"y": [1, 2], "x": 1}).key
    assert Task("a", {"x": 1}).key != Task("a", {"x": 2}).key
