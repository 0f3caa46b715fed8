"""peftkit.train.data: readers and their errors, the split, encoding with loss masks, deterministic batches."""

from __future__ import annotations

import bz2
import collections
import json

import pytest
import torch

from peftkit.errors import DataError
from peftkit.train.data import (
    IGNORE_INDEX,
    Batcher,
    Encoded,
    PromptTemplate,
    collate,
    detect_format,
    encode,
    make_batches,
    read_csv,
    read_jsonl,
    rotten_tomatoes,
    split,
)

from .tiny_text import ids, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- readers


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', "", '{"prompt": "c", '
                                              '"completion": "d", "extra": 1}'])
    assert read_jsonl(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d", "extra": 1}]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b"'])
    with pytest.raises(DataError, match=rf"{tmp_path / 'd.jsonl'}:3: malformed JSON"):
        read_jsonl(path)


def test_read_jsonl_missing_field_names_line_and_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "c"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field\(s\) \['completion'\]"):
        read_jsonl(path)


def test_read_jsonl_explicit_fields_and_non_objects(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field\(s\) \['label'\]"):
        read_jsonl(path, fields=("text", "label"))
    write_lines(path, ["[1, 2]"])
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)
    write_lines(path, ['{"question": "a"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: has fields \['question'\]; expected"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        read_jsonl(path)


def test_detect_format_order():
    assert detect_format({"prompt": "", "completion": "", "text": ""}) == "prompt_completion"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"text": "", "label": 1}) == "classification"
    assert detect_format({"text": ""}) == "text"


def test_read_csv_columns_and_labels(tmp_path):
    path = write_lines(tmp_path / "d.csv", ["review,stars,id", '"good, really",1,a', "bad,0,b"])
    assert read_csv(path, {"text": "review", "label": "stars"}) == [
        {"text": "good, really", "label": 1}, {"text": "bad", "label": 0}]
    assert read_csv(path, ["id"]) == [{"id": "a"}, {"id": "b"}]
    assert read_csv(path, {"text": "review", "label": "id"}, label_map={"b": 7}) == [{"text": "bad", "label": 7}]


def test_read_csv_errors(tmp_path):
    path = write_lines(tmp_path / "d.csv", ["review,stars", "good,1", "bad,zero"])
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]; the header has \['review', 'stars'\]"):
        read_csv(path, ["text"])
    with pytest.raises(DataError, match=r"d\.csv:3: label 'zero' is not an integer"):
        read_csv(path, {"text": "review", "label": "stars"})
    write_lines(path, ["review,stars"])
    with pytest.raises(DataError, match="is empty"):
        read_csv(path, ["review"])


def test_rotten_tomatoes_reader(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    rows = ["category,text,movie_name,has_plot_and_reviews", "plot,A plot.,m,True", "fresh,Great  fun.,m,True",
            "rotten,Dull.,m,True", "fresh,Great fun.,n,True"]
    with bz2.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    assert rotten_tomatoes(path) == [{"text": "Great fun.", "label": 1}, {"text": "Dull.", "label": 0}]


# ---------------------------------------------------------------------------------------------- split


def labelled(n_pos=60, n_neg=40):
    return [{"text": f"t{i}", "label": int(i < n_pos)} for i in range(n_pos + n_neg)]


def test_split_is_deterministic_disjoint_and_complete():
    examples = labelled()
    train, held = split(examples, 20, seed=3)
    assert (train, held) == split(examples, 20, seed=3)
    assert split(examples, 20, seed=4) != (train, held)
    assert len(held) == 20 and len(train) == 80
    assert sorted(e["text"] for e in train + held) == sorted(e["text"] for e in examples)


def test_split_is_stratified():
    for seed in range(5):
        _, held = split(labelled(), 20, seed=seed)
        assert collections.Counter(e["label"] for e in held) == {1: 12, 0: 8}
    _, held = split(labelled(7, 3), 5, seed=0)  # 3.5 / 1.5: largest remainders, ties to the first label
    assert collections.Counter(e["label"] for e in held) == {0: 2, 1: 3}


def test_split_fraction_unlabelled_and_errors():
    plain = [{"text": str(i)} for i in range(10)]
    train, held = split(plain, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7
    for bad in (0, 10, 1.0, -1, True):
        with pytest.raises(DataError, match="eval_size"):
            split(plain, bad)


# ---------------------------------------------------------------------------------------------- encoding


def test_prompt_completion_masks_the_prompt(tok):
    enc = encode({"prompt": "what is it ?", "completion": "a film"}, tok, max_length=32)
    prompt, completion = ids(tok, "what is it ?"), ids(tok, "a film") + [tok.eos_token_id]
    assert enc.input_ids == prompt + completion
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_prompt_is_truncated_from_the_left(tok):
    enc = encode({"prompt": "hello there what is it ?", "completion": "a film"}, tok, max_length=5)
    assert enc.input_ids == ids(tok, "it ?") + ids(tok, "a film") + [tok.eos_token_id]
    assert enc.labels[:2] == [IGNORE_INDEX] * 2
    enc = encode({"prompt": "hi", "completion": "a very good film"}, tok, max_length=3)
    assert enc.input_ids == ids(tok, "a very good") and enc.labels == enc.input_ids


def test_classification_loss_is_on_the_label_word_only(tok):
    template = PromptTemplate()
    enc = encode({"text": "a great film", "label": 1}, tok, max_length=32, template=template)
    assert enc.input_ids == ids(tok, "review : a great film sentiment : positive")
    assert enc.labels == [IGNORE_INDEX] * (len(enc.input_ids) - 1) + ids(tok, "positive")


def test_classification_truncates_the_text_not_the_frame(tok):
    enc = encode({"text": "a great film and a very good plot", "label": 0}, tok, max_length=8)
    assert enc.input_ids == ids(tok, "review : a great film sentiment : negative")


def test_prompt_template_errors():
    with pytest.raises(DataError, match="needs field 'title'"):
        PromptTemplate("{title}: {text}").prompt({"text": "x"})
    with pytest.raises(DataError, match="label 2 has no label word"):
        PromptTemplate().word(2)
    with pytest.raises(DataError, match="repeated words"):
        PromptTemplate(label_words={0: " a", 1: " a"})


def test_chat_masks_everything_but_assistant_turns(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "why ?"}, {"role": "assistant", "content": "no"}]
    enc = encode({"messages": messages}, tok, max_length=64)
    expected = ids(tok, "<s> user : hello </s> <s> assistant : hi there </s> <s> user : why ? </s> "
                        "<s> assistant : no </s>")
    assert enc.input_ids == expected
    labelled_ids = [t if t != IGNORE_INDEX else None for t in enc.labels]
    assert labelled_ids == [None] * 8 + ids(tok, "hi there </s>") + [None] * 9 + ids(tok, "no </s>")


def test_chat_errors(tok):
    with pytest.raises(DataError, match="must not start with an assistant turn"):
        encode({"messages": [{"role": "assistant", "content": "hi"}]}, tok, 32)
    with pytest.raises(DataError, match="chat template"):
        encode({"messages": [{"role": "user", "content": "hi"}]}, tiny_tokenizer(chat=False), 32)


def test_plain_text_and_seq_cls(tok):
    enc = encode({"text": "a good film"}, tok, max_length=2)
    assert enc.input_ids == enc.labels == ids(tok, "a good")
    enc = encode({"text": "a good film", "label": 1}, tok, max_length=2, task="seq_cls")
    assert enc == Encoded(ids(tok, "a good"), 1)
    with pytest.raises(DataError, match="task 'seq_cls' needs"):
        encode({"text": "a good film"}, tok, max_length=8, task="seq_cls")


def test_collate_pads_right_and_masks_padding():
    batch = collate([Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert collate([Encoded([1], 0), Encoded([2, 3], 1)], pad_id=0)["labels"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- batches


def batcher(tok, n=10, **kwargs):
    examples = [{"text": " ".join(["a"] * (i + 1)), "label": i % 2} for i in range(n)]
    settings = {"max_length": 16, "batch_size": 3, "seed": 0, **kwargs}
    return Batcher(examples, tok, **settings), examples


def first_text_lengths(batch):
    return batch["attention_mask"].sum(dim=1).tolist()


def test_batches_are_deterministic_by_seed_and_epoch(tok):
    b, _ = batcher(tok, group_by_length=False)
    epoch0 = [first_text_lengths(x) for x in b.batches_for_epoch(0)]
    assert epoch0 == [first_text_lengths(x) for x in batcher(tok, group_by_length=False)[0].batches_for_epoch(0)]
    assert epoch0 != [first_text_lengths(x) for x in b.batches_for_epoch(1)]
    assert epoch0 != [first_text_lengths(x) for x in batcher(tok, seed=1, group_by_length=False)[0]
                      .batches_for_epoch(0)]
    assert len(b) == 4 and sorted(len(x) for x in epoch0) == [1, 3, 3, 3]
    assert sorted(n for x in epoch0 for n in x) == [6 + i for i in range(10)]  # every example once


def test_group_by_length_sorts_each_window_and_keeps_the_epoch(tok, monkeypatch):
    monkeypatch.setattr(Batcher, "WINDOW_BATCHES", 2)
    grouped, _ = batcher(tok, n=13, batch_size=2)
    plain, _ = batcher(tok, n=13, batch_size=2, group_by_length=False)
    order = plain.order(5)
    assert [plain.indices(5, k) for k in range(len(plain))] == [order[i: i + 2] for i in range(0, 13, 2)]
    for window in range(4):  # windows of 2 batches = 4 examples of the permutation, sorted by length
        batches = sorted(grouped.indices(5, 2 * window + k) for k in range(2) if 2 * window + k < len(grouped))
        assert sorted(i for b in batches for i in b) == sorted(order[4 * window: 4 * window + 4])
        assert all(max(a) < min(b) or max(b) < min(a) for a in batches for b in batches if a != b)
    assert [grouped.indices(5, k) for k in range(7)] == [batcher(tok, n=13, batch_size=2)[0].indices(5, k)
                                                         for k in range(7)]


def test_batches_are_position_addressable(tok):
    b, examples = batcher(tok)
    epoch = b.batches_for_epoch(2)
    straight = list(epoch)
    for position in (3, 1, -1):
        for key, value in epoch[position].items():
            assert torch.equal(value, straight[position][key])
    assert [first_text_lengths(x) for x in epoch[2:]] == [first_text_lengths(x) for x in straight[2:]]
    with pytest.raises(IndexError):
        epoch[4]
    listed = make_batches(examples, tok, max_length=16, batch_size=3, seed=0, epoch=2)
    assert [x["input_ids"].tolist() for x in listed] == [x["input_ids"].tolist() for x in straight]


def test_batcher_drop_last_and_errors(tok):
    assert len(batcher(tok, drop_last=True)[0]) == 3
    with pytest.raises(DataError, match="training set is empty"):
        Batcher([], tok, max_length=8, batch_size=2)
    with pytest.raises(DataError, match="batch_size"):
        Batcher([{"text": "a"}], tok, max_length=8, batch_size=0)
    chat = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match="no tokens with a loss"):
        Batcher(chat, tok, max_length=4, batch_size=1).batch(0, 0)


def test_jsonl_to_batches_end_to_end(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "hello", "completion": "hi there"})] * 4)
    batches = make_batches(read_jsonl(path), tok, max_length=16, batch_size=2)
    assert len(batches) == 2
    assert batches[0]["labels"][0].tolist() == [IGNORE_INDEX] + ids(tok, "hi there") + [tok.eos_token_id]
