"""Board transcripts and reading documents: cells are exactly the sum of their words and place, documents
are exactly the Vicuna v1 conversation stage 2 trains on, and the reading probe scores the answer tokens."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from vlmablate.model.tiny import train_tiny_tokenizer
from vlmablate.world import language
from vlmablate.world.board import EMPTY, N_CELLS, BoardEmbedding, embed_inputs
from vlmablate.world.reading import (
    IGNORE_INDEX,
    SHORT_ANSWER,
    SYSTEM,
    Encoder,
    ReadingConfig,
    collate,
    probe_items,
    reading_document,
    reading_probe,
)
from vlmablate.world.scenes import Obj, Scene


@pytest.fixture(scope="module")
def enc():
    words = " ".join(language.CATEGORIES) + " circle square triangle cross diamond red green blue yellow purple " \
        "orange small large solid outline plain dotted top bottom left right What colour is the Is there a"
    return Encoder(train_tiny_tokenizer(600, extra_text=(words + " ") * 50))


SCENE = Scene((Obj("diamond", "red", "large", "solid", 0, 1),
               Obj("circle", "blue", "small", "outline", 3, 3, mark="dotted")))


def test_cells_are_word_ids_in_raster_order(enc):
    ids = enc.vocab.ids
    cells = enc.vocab.cells(SCENE)
    assert cells.shape == (N_CELLS, 5)
    assert cells[1].tolist() == [ids["large"], ids["red"], ids["diamond"], ids["solid"], ids["plain"]]
    assert cells[15].tolist() == [ids["small"], ids["blue"], ids["circle"], ids["outline"], ids["dotted"]]
    assert (cells[[0, *range(2, 15)]] == EMPTY).all()
    assert (enc.vocab.cells(None) == EMPTY).all()
    # Cell 1 is row 0, column 1: the top left quarter; cell 15 the bottom right.
    assert enc.vocab.place_ids[1].tolist() == [ids["top"], ids["left"]]
    assert enc.vocab.place_ids[15].tolist() == [ids["bottom"], ids["right"]]
    assert enc.vocab.place_ids[6].tolist() == [ids["top"], ids["right"]]


def test_a_cell_is_the_sum_of_its_words_and_its_place(enc):
    torch.manual_seed(0)
    table = nn.Embedding(len(enc.tokenizer), 8)
    board = BoardEmbedding(8, enc.vocab.place_ids)
    vectors = board(table, enc.vocab.cells(SCENE).unsqueeze(0))[0]
    ids, w = enc.vocab.ids, table.weight
    place = lambda c, r, k: board.place[c] + w[ids[r]] + w[ids[k]]  # noqa: E731
    red_diamond = w[ids["large"]] + w[ids["red"]] + w[ids["diamond"]] + w[ids["solid"]] + w[ids["plain"]]
    torch.testing.assert_close(vectors[1], red_diamond + place(1, "top", "left"))
    torch.testing.assert_close(vectors[0], board.empty + place(0, "top", "left"))
    torch.testing.assert_close(vectors[12], board.empty + place(12, "bottom", "left"))


def test_embed_inputs_fills_exactly_the_image_slots(enc):
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(enc.tokenizer), 8)

        def get_input_embeddings(self):
            return self.emb

    lm, board = LM(), BoardEmbedding(8, enc.vocab.place_ids)
    doc = reading_document(SCENE, random.Random(0), enc, ReadingConfig())
    ids = torch.tensor([doc.input_ids])
    out = embed_inputs(lm, board, ids, enc.vocab.cells(SCENE).unsqueeze(0), enc.image_token_id)
    slots = (ids[0] == enc.image_token_id).nonzero().flatten()
    assert slots.tolist() == list(range(int(slots[0]), int(slots[0]) + N_CELLS))
    torch.testing.assert_close(out[0, slots], board(lm.emb, enc.vocab.cells(SCENE).unsqueeze(0))[0])
    text = torch.ones(ids.shape[1], dtype=torch.bool)
    text[slots] = False
    torch.testing.assert_close(out[0, text], lm.emb(ids[0, text]))
    with pytest.raises(ValueError, match="exactly 16 image tokens"):
        embed_inputs(lm, board, ids[:, 1:] if int(slots[0]) == 0 else ids[:, : int(slots[1])],
                     enc.vocab.cells(SCENE).unsqueeze(0), enc.image_token_id)


def test_a_document_is_the_vicuna_conversation_with_the_board_for_the_image(enc):
    turns = [("What colour is the diamond?" + SHORT_ANSWER, "red", "colour"),
             ("Is the blue circle below the red diamond?", "Yes, the blue circle is below the red diamond.", "spatial")]
    doc = reading_document(SCENE, random.Random(0), enc, ReadingConfig(), turns=turns, system=True)
    messages = [{"role": "user", "content": "<image>\n" + turns[0][0]}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": turns[1][0]}, {"role": "assistant", "content": turns[1][1]}]
    expected = enc.tokenizer.apply_chat_template(messages, tokenize=False)
    assert expected.startswith(SYSTEM)
    assert enc.tokenizer.decode(doc.input_ids) == "<s>" + expected.replace("<image>", "<image>" * N_CELLS)
    # The loss covers everything but the cells; the answers are " red</s>" and the sentence with its </s>.
    learned = [t for t, keep in zip(doc.input_ids, doc.learn) if not keep]
    assert learned == [enc.image_token_id] * N_CELLS
    assert [enc.tokenizer.decode(doc.input_ids[a:b]) for a, b, _ in doc.answers] == \
        [" red</s>", " " + turns[1][1] + "</s>"]
    answers_only = reading_document(SCENE, random.Random(0), enc, ReadingConfig(loss="answer"), turns=turns)
    kept = [i for i, keep in enumerate(answers_only.learn) if keep]
    assert kept == [i for a, b, _ in answers_only.answers for i in range(a, b)]


@pytest.fixture(scope="module")
def world_enc():
    from vlmablate.world.reader import world_tokenizer

    return Encoder(world_tokenizer())


def test_a_document_has_exactly_the_token_ids_stage_2_trains_on(world_enc):
    """What the LM reads in pretraining is token for token what the runner feeds it later (a frozen LM
    sees no new tokenization of "ASSISTANT:" or of the options), in every answer format."""
    from transformers import LlavaProcessor

    from vlmablate.data.templates import encode_conversation
    from vlmablate.world.pretrain import build_image_processor
    from vlmablate.world.reading import _turn
    from vlmablate.world.scenes import render, sample_scene, scene_rng

    enc = world_enc
    processor = LlavaProcessor(image_processor=build_image_processor(64), tokenizer=enc.tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", chat_template=enc.tokenizer.chat_template,
                               num_additional_image_tokens=1, image_token="<image>")
    rng, compared = random.Random(0), 0
    for i in range(20):
        scene = sample_scene(scene_rng(0, "tokens", i))
        turns = [t for fmt in ("short", "sentence", "choice")
                 if (t := _turn(scene, rng.choice(language.CATEGORIES), fmt, rng, suffix=i % 2 == 0))]
        doc = reading_document(scene, rng, enc, ReadingConfig(), turns=turns, system=True)
        conversation = [m for k, (q, a, *_) in enumerate(turns)
                        for m in ({"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                                  {"from": "gpt", "value": a})]
        encoded = encode_conversation(conversation, template="chat", processor=processor, image=render(scene),
                                      max_length=1024, record_ref=f"doc {i}")
        assert encoded["input_ids"].tolist() == doc.input_ids, f"document {i}"
        # stage 2 learns the answers only; the reading documents also learn the questions
        answers = [p for a, b, _ in doc.answers for p in range(a, b)]
        assert [p for p, v in enumerate(encoded["labels"].tolist()) if v != IGNORE_INDEX] == answers
        compared += 1
    assert compared == 20


def test_drawn_documents_follow_the_config(enc):
    cfg = ReadingConfig(kinds=("colour", "size"), qa_per_doc=(2, 2), system_share=0.0, suffix_share=1.0)
    rng = random.Random(1)
    for _ in range(20):
        doc = reading_document(SCENE, rng, enc, cfg)
        assert [k for _, _, k in doc.answers] in (["colour", "colour"], ["colour", "size"], ["size", "colour"],
                                                   ["size", "size"])
        text = enc.tokenizer.decode(doc.input_ids)
        assert not text.startswith("<s>" + SYSTEM) and text.count(SHORT_ANSWER) == 2
    ids, labels, mask = collate([reading_document(SCENE, rng, enc, cfg), reading_document(SCENE, rng, enc, cfg,
                                 turns=[("Is it?", "yes", "existence")])], enc.tokenizer.pad_token_id)
    short = int(mask[1].sum())
    assert (ids[1, short:] == enc.tokenizer.pad_token_id).all() and (labels[1, short:] == IGNORE_INDEX).all()
    assert ReadingConfig(curriculum_steps=400).max_objects_at(0) == 1
    assert [ReadingConfig(curriculum_steps=400).max_objects_at(s) for s in (99, 100, 399, 400, 9999)] == [1, 2, 4, 5, 5]
    with pytest.raises(ValueError, match="bad reading config"):
        ReadingConfig(kinds=("colour", "mood"))


class _Oracle(nn.Module):
    """Predicts each next token of the row it is given (when `right`), or always token 0."""

    def __init__(self, vocab: int, right: bool):
        super().__init__()
        self.emb, self.vocab, self.right, self.ids = nn.Embedding(vocab, 4), vocab, right, None

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask):
        # The oracle reads the ids back from the embeddings: each text position's embedding is unique.
        ids = torch.cdist(inputs_embeds, self.emb.weight.unsqueeze(0)).argmin(-1)
        nxt = torch.roll(ids, -1, dims=1) if self.right else torch.zeros_like(ids)
        return type("Out", (), {"logits": nn.functional.one_hot(nxt, self.vocab).float()})()


def test_the_probe_scores_the_answer_tokens(enc):
    items = probe_items(enc, ("colour", "spatial"), n_per_kind=6)
    assert [len(v) for v in items.values()] == [6, 6]
    doc = items["colour"][0]
    assert enc.tokenizer.decode(doc.input_ids).startswith("<s>" + SYSTEM + " USER: <image>")
    assert SHORT_ANSWER in enc.tokenizer.decode(doc.input_ids)
    assert all(len(d.scene.objects) >= 2 for d in items["spatial"])
    assert probe_items(enc, ("colour",), 6)["colour"][3].input_ids == items["colour"][3].input_ids  # deterministic
    torch.manual_seed(0)
    board = BoardEmbedding(4, enc.vocab.place_ids)
    vocab = len(enc.tokenizer)
    assert reading_probe(_Oracle(vocab, True), board, enc, items) == {"colour": 1.0, "spatial": 1.0}
    assert reading_probe(_Oracle(vocab, False), board, enc, items) == {"colour": 0.0, "spatial": 0.0}


def test_choice_answers_are_the_letter_of_the_right_option(enc):
    from vlmablate.world.data import CHOICE_PROMPT

    cfg = ReadingConfig(kinds=("colour",), formats=("choice",), qa_per_doc=(1, 1), system_share=0.0)
    for seed in range(10):
        doc = reading_document(SCENE, random.Random(seed), enc, cfg)
        (a, b, kind), = doc.answers
        text = enc.tokenizer.decode(doc.input_ids[:a])
        options = dict(line.split(". ", 1) for line in text.split("\n") if line[:2] in ("A.", "B.", "C.", "D."))
        letter = enc.tokenizer.decode(doc.input_ids[a:b]).strip().removesuffix("</s>")
        truth = "red" if "diamond" in text.split("\n")[1] else "blue"
        assert kind == "colour" and text.endswith(CHOICE_PROMPT + " ASSISTANT:") and options[letter] == truth


def test_a_described_document_opens_with_every_object(enc):
    cfg = ReadingConfig(kinds=("size",), describe_share=1.0, qa_per_doc=(2, 2), system_share=0.0)
    doc = reading_document(SCENE, random.Random(0), enc, cfg)
    assert [k for _, _, k in doc.answers] == ["describe", "size", "size"]
    a, b, _ = doc.answers[0]
    assert enc.tokenizer.decode(doc.input_ids[a:b]) == " " + language.describe(SCENE) + "</s>"


def test_every_question_names_the_cells_its_answer_is_read_from():
    scene = Scene((Obj("diamond", "red", "large", "solid", 0, 1), Obj("circle", "blue", "small", "outline", 3, 3),
                   Obj("circle", "red", "small", "solid", 2, 0)))
    diamond, blue_circle, red_circle = 1, 15, 8
    rng, seen = random.Random(0), {}
    for _ in range(400):
        for item in language.questions(scene, rng):
            seen.setdefault(item["category"], set()).add((item["question"], item["answer"], tuple(item["cells"])))
    assert ("What colour is the diamond?", "red", (diamond,)) in seen["colour"]
    # "small" is shared by both circles, so the reference qualifies by fill
    assert ("What colour is the small circle?", "blue", (blue_circle,)) not in seen["colour"]
    assert ("What colour is the outline circle?", "blue", (blue_circle,)) in seen["colour"]
    assert ("What shape is the blue object?", "circle", (blue_circle,)) in seen["shape"]
    assert ("Is there a red circle?", "yes", (red_circle,)) in seen["existence"]
    assert ("Is there a blue diamond?", "no", ()) in seen["existence"]
    assert ("How many circles are there?", "2", (red_circle, blue_circle)) in seen["counting"]
    assert ("Where is the red diamond?", "top left", (diamond,)) in seen["position"]
    assert ("Is the red circle left of the blue circle?", "yes", (red_circle, blue_circle)) in seen["spatial"]
    assert all(len(cells) == 1 for kind in ("colour", "shape", "position", "size", "fill")
               for _, _, cells in seen[kind])


def test_targets_point_at_the_key_word_the_answer_and_the_cells(enc):
    scene = Scene((Obj("diamond", "red", "large", "solid", 0, 1), Obj("diamond", "blue", "small", "outline", 3, 3)))
    turns = [("What colour is the large diamond?", "red", "colour", (1,)),
             ("Is there a green circle?", "no", "existence", ()),
             ("What shape is the blue object?" + SHORT_ANSWER, "diamond", "shape", (15,))]
    doc = reading_document(scene, random.Random(0), enc, ReadingConfig(), turns=turns, system=False)
    board = doc.input_ids.index(enc.image_token_id)
    tokens = enc.tokenizer.convert_ids_to_tokens(doc.input_ids)
    first, second = doc.targets  # the "no" has no cells and no target
    assert [tokens[first.key], tokens[first.asked], tokens[second.key], tokens[second.asked]] == \
        ["Ġdiamond", "?", "Ġblue", "?"]
    assert (first.answer, second.answer) == (doc.answers[0][0] - 1, doc.answers[2][0] - 1)
    assert first.cells == (board + 1,) and first.match == (board + 1, board + 15)  # both diamonds
    assert second.cells == second.match == (board + 15,)


def test_a_choice_question_knows_where_its_letters_options_and_key_are(world_enc):
    from vlmablate.world.reading import _turn

    enc = world_enc
    scene = Scene((Obj("diamond", "red", "large", "solid", 0, 1), Obj("circle", "blue", "small", "outline", 3, 3)))
    for kind, seed in (("colour", 0), ("position", 1), ("size", 2)):
        question, answer, _, cells, options = _turn(scene, kind, "choice", random.Random(seed), suffix=False)
        doc = reading_document(scene, random.Random(0), enc, ReadingConfig(), turns=[(question, answer, kind, cells,
                                                                                       options)], system=False)
        (choice,), (target,) = doc.choices, doc.targets
        decode = lambda ids: enc.tokenizer.decode([doc.input_ids[p] for p in ids])  # noqa: E731
        assert [decode([p]) for p in choice.letters] == list("ABCD")[: len(options[0])]
        assert [decode(span) for span in choice.options] == [" " + o for o in options[0]]
        assert choice.options[choice.correct] == choice.options[ord(answer) - ord("A")]
        assert decode(choice.options[choice.correct]) == " " + options[1]
        assert enc.tokenizer.decode([choice.content]) == " " + options[1].split()[0]
        assert [enc.tokenizer.decode([t]) for t in choice.letter_ids] == [" " + x for x in "ABCD"][: len(options[0])]
        assert choice.answer == target.answer == doc.answers[0][0] - 1 and choice.key == target.key
        assert doc.input_ids[choice.answer + 1] == choice.letter_ids[choice.correct]  # the answer is the letter
    assert decode([choice.key]) == " diamond"  # "Is the red diamond large or small?": the key is its shape
