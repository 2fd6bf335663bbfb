"""Image input: built-in data, CLIP loss, projection, ChatML with images, the engine's image embeddings,
the checkpoint's vision part, and the clip-train / sft-vision / eval-vision / chat commands on tiny models.

    python -m pytest tests/test_vision.py -q
"""

import io
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import small_tokenizer

from chatstack.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chatstack.cli import main
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.serve.testing import TINY_CLIP as TINY_CLIP_ARGS
from chatstack.serve.testing import make_tiny_vision_checkpoint
from chatstack.vision import data as D
from chatstack.vision.chat_data import TrainExamples, collate, eval_examples
from chatstack.vision.encoder import CLIP, CLIPConfig, clip_logits, clip_loss, zero_shot_classify
from chatstack.vision.projection import VisionAdapter, VisionConfig
from chatstack.vision.vlm import VisionChatModel, load_vision, place_images, render_request

TINY_CLIP = CLIPConfig(**TINY_CLIP_ARGS)


# ---- data -------------------------------------------------------------------------------------------------
def test_digit_split_is_disjoint_and_complete():
    from sklearn.datasets import load_digits

    xtr, ytr = D.digits("train")
    xte, yte = D.digits("test")
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    assert xtr.shape[1:] == (3, 32, 32) and 0 <= float(xtr.min()) and float(xtr.max()) <= 1
    assert sorted(torch.cat([ytr, yte]).tolist()) == sorted(load_digits().target.tolist())
    # no held-out image is also a training image
    tr = {tuple(x.flatten().tolist()) for x in xtr[:, 0, ::4, ::4]}
    assert sum(tuple(x.flatten().tolist()) in tr for x in xte[:, 0, ::4, ::4]) <= 3  # sklearn has a few exact twins


def test_scene_answers_match_the_pixels():
    rng = random.Random(0)
    for s in D.scenes("test", 30, 0):
        assert s.held_out()
        img = s.draw()
        xs = [o.x for o in s.objects]
        assert xs == sorted(xs) and len({o.colour for o in s.objects}) == len(s.objects)
        for o in s.objects:
            # the centre pixel of each object has its colour (an independent check on the drawing)
            px = tuple(round(float(v) * 255) for v in img[:, o.y, o.x])
            assert px == D.COLOURS[o.colour], (o, px)
        q, a = D.scene_question(s, "count", rng)
        # count the distinct non-black colours in the image
        colours = {tuple(round(float(v) * 255) for v in img[:, y, x]) for y in range(32) for x in range(32)}
        assert int(a) == len(colours & set(D.COLOURS.values()))
        if len(s.objects) > 1:
            q, a = D.scene_question(s, "position", rng)
            words = q.split()
            first = next(o for o in s.objects if o.colour == words[2])
            second = next(o for o in s.objects if o.colour == words[-2])
            assert a == ("left" if first.x < second.x else "right")
        q, a = D.scene_question(s, "where", rng)
        o = next(o for o in s.objects if o.colour == q.split()[3])
        # the band from the pixels: which third of the canvas holds the object's centre
        assert a == ("left", "middle", "right")[o.x * 3 // 32]
        q, a = D.scene_question(s, "describe", rng)
        # the description names each object's colour and shape in the order of its centre's column in the pixels
        by_x = sorted(s.objects, key=lambda o: o.x)
        assert a.split(" left of ") == [f"a {o.colour} {o.shape}" for o in by_x]
    assert not any(s.held_out() for s in D.scenes("train", 50, 0))


def test_question_weights_shape_the_training_conversations():
    from chatstack.stages.sft_vision import parse_question_weights
    from chatstack.vision.chat_data import TrainExamples, question_of

    def share(weights):
        ex, counts = TrainExamples(0, digit_share=0.0, weights=weights), {}
        for i in range(600):
            for m in ex(i)["messages"]:
                if m["role"] == "user":
                    w = question_of(m).split()[0]
                    counts[w] = counts.get(w, 0) + 1
        return counts

    plain, heavy = share(None), share(parse_question_weights("position=4,where=1,count=0"))
    assert "Where" not in plain and "Where" in heavy  # the training-only types are off unless weighted
    assert "Describe" not in plain and "Describe" not in heavy
    described = TrainExamples(0, digit_share=0.0, weights=parse_question_weights("describe=5"))
    convs = [described(i)["messages"] for i in range(200)]
    asked = [[question_of(m).split()[0] for m in c if m["role"] == "user"] for c in convs]
    assert sum("Describe" in a for a in asked) > 100
    # a description is the last question: no later answer can be read off its text
    assert all(a.index("Describe") == len(a) - 1 for a in asked if "Describe" in a)
    one, four = (TrainExamples(0, digit_share=0.0, max_turns=k) for k in (1, 4))
    assert all(len(one(i)["messages"]) == 2 for i in range(100))
    assert max(len(four(i)["messages"]) for i in range(100)) == 8  # the four evaluated types, each once
    assert "How" in plain and "How" not in heavy  # count questions begin "How many"
    assert heavy["Is"] > 1.5 * plain["Is"]  # position questions begin "Is the"
    assert parse_question_weights("") == {}
    for bad in ["position", "size=2", "colour=-1", "shape=x", "colour=0,shape=0,count=0,position=0"]:
        with pytest.raises(ValueError, match="--question-weights"):
            parse_question_weights(bad)


def test_counterfactual_keeps_the_layout_and_changes_the_caption():
    rng = random.Random(0)
    kinds = set()
    for s in D.scenes("train", 60, 1):
        c = D.counterfactual(s, rng)
        assert c.caption() != s.caption() and len(c.objects) == len(s.objects)
        assert sorted((o.x, o.y, o.r) for o in c.objects) == sorted((o.x, o.y, o.r) for o in s.objects)
        assert [o.x for o in c.objects] == sorted(o.x for o in c.objects)
        if len(s.objects) > 1:  # the same colours and shapes, differently bound or placed
            assert {o.colour for o in c.objects} == {o.colour for o in s.objects}
            assert {o.shape for o in c.objects} == {o.shape for o in s.objects}
            same_pairs = {(o.colour, o.shape) for o in c.objects} == {(o.colour, o.shape) for o in s.objects}
            kinds.add("place" if same_pairs else "binding")
    assert kinds == {"place", "binding"}


def test_clip_hard_negatives_follow_their_scene():
    from chatstack.stages.clip_train import CLIPTask, CLIPTrainConfig

    def captions(hard_negatives):
        cfg = CLIPTrainConfig(builtin="scenes", batch_size=16, hard_negatives=hard_negatives)
        b = CLIPTask(cfg, ["scenes"], 64).train_batch(3, 0, 0, 1)
        return [bytes((b["ids"][i][b["mask"][i]] - 1).tolist()).decode() for i in range(16)]

    def rearranged(a, c):  # the same layout with attributes moved: same words in another order, or one word changed
        if a == c or len(a.split()) != len(c.split()):
            return False
        if "left of" in a:
            return sorted(a.split()) == sorted(c.split())
        return sum(x != y for x, y in zip(a.split(), c.split())) == 1

    hard = captions(1.0)
    assert hard == captions(1.0)  # a pure function of the step
    # every scene is followed by its rearrangement (unless that one is held out: then by a fresh scene)
    assert sum(rearranged(a, c) for a, c in zip(hard, hard[1:])) >= 6
    plain = captions(0.0)  # (two random one-shape scenes differ in one word by chance: 1 time in 4)
    assert sum(rearranged(a, c) for a, c in zip(plain, plain[1:])) <= 3


def test_decode_image_errors(tmp_path):
    import io

    from PIL import Image

    with pytest.raises(ValueError, match="not an image"):
        D.decode_image(b"hello, world", "upload")
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    with pytest.raises(ValueError, match="too large"):
        D.decode_image(buf.getvalue(), "upload")
    with pytest.raises(ValueError, match="no such image file"):
        D.load_image(tmp_path / "missing.png")
    p = tmp_path / "d.png"
    D.to_pil(D.digits("test")[0][0]).save(p)
    assert torch.allclose(D.load_image(p), D.digits("test")[0][0], atol=1 / 255 + 1e-6)


# ---- CLIP -------------------------------------------------------------------------------------------------
def test_clip_loss_matches_a_brute_force_reference():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = clip_logits(img, txt, scale)
    ref = 0.0
    for i in range(5):
        sims = [10.0 * float(img[i] @ txt[j]) for j in range(5)]
        ref += -(sims[i] - math.log(sum(math.exp(s) for s in sims))) / 10
        sims = [10.0 * float(img[j] @ txt[i]) for j in range(5)]
        ref += -(sims[i] - math.log(sum(math.exp(s) for s in sims))) / 10
    assert float(clip_loss(logits)) == pytest.approx(ref, rel=1e-5)
    # the learned temperature is capped at 100, as in CLIP
    assert float(clip_logits(img[:1], img[:1], torch.tensor(10.0))) == pytest.approx(100.0, rel=1e-5)


def test_zero_shot_classify_is_nearest_prompt():
    torch.manual_seed(0)
    m = CLIP(TINY_CLIP).eval()
    imgs = torch.rand(6, 3, 32, 32)
    prompts = ["a photo of the digit one", "a red circle", "the number 7"]
    pred = zero_shot_classify(m, imgs, prompts)
    with torch.no_grad():
        sims = m.encode_image(imgs) @ m.encode_text(prompts).t()
    assert pred.tolist() == sims.argmax(-1).tolist()
    assert m.image.tokens(imgs).shape == (6, 16, 16)


def test_projection_pools_the_grid_row_major():
    torch.manual_seed(0)
    ad = VisionAdapter(VisionConfig(clip=TINY_CLIP, n_embd=32, image_tokens=4))
    grid = torch.randn(2, 16, 16)
    pooled = ad.projection.fc2(
        F.gelu(
            ad.projection.fc1(
                grid.view(2, 4, 4, 16).unflatten(1, (2, 2)).unflatten(3, (2, 2)).mean((2, 4)).reshape(2, 4, 16)
            )
        )
    )
    assert torch.allclose(ad.projection(grid), pooled + ad.projection.pos, atol=1e-6)
    with pytest.raises(ValueError, match="image_tokens"):
        VisionConfig(clip=TINY_CLIP, n_embd=32, image_tokens=9)


def test_coords_add_one_direction_per_axis(tmp_path):
    from chatstack.estimate import vision_params

    torch.manual_seed(0)
    cfg = VisionConfig(clip=TINY_CLIP, n_embd=32, image_tokens=4, coords=True)
    assert (
        VisionConfig.from_dict(cfg.to_dict()).coords
        and not VisionConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "coords"}).coords
    )  # checkpoints written before the field load as they were
    ad = VisionAdapter(cfg)
    plain = VisionAdapter(VisionConfig(clip=TINY_CLIP, n_embd=32, image_tokens=4))
    plain.load_state_dict(ad.state_dict(), strict=False)
    grid = torch.randn(1, 16, 16)
    extra = (ad.projection(grid) - plain.projection(grid))[0]  # (4, 32): the coords' part, row-major 2x2 cells
    wx, wy = ad.projection.coord.weight.T
    # cell centres at -0.5 and +0.5 on each axis: one step right adds wx, one step down adds wy, in every row
    assert torch.allclose(extra[1] - extra[0], wx, atol=1e-6) and torch.allclose(extra[3] - extra[2], wx, atol=1e-6)
    assert torch.allclose(extra[2] - extra[0], wy, atol=1e-6)
    assert torch.allclose(extra[0], -0.5 * (wx + wy), atol=1e-6)
    assert vision_params(cfg.to_dict())["projection"] == sum(p.numel() for p in ad.projection.parameters())


# ---- ChatML with images -----------------------------------------------------------------------------------
def test_render_multimodal_places_image_tokens():
    tok = small_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
    ]
    ids, mask, pos = tok.render_multimodal(msgs, 4)
    assert (ids, mask) == tok.render_chat(msgs) and pos == []
    ids, _, _ = tok.render_multimodal(msgs[:2], 4, generation_prompt=True)
    assert ids == tok.render_prompt(msgs[:2])
    img_msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "7"},
    ]
    ids, mask, pos = tok.render_multimodal(img_msgs, 4)
    head = [tok.im_start_id] + tok.encode("user\n")
    assert pos == list(range(len(head), len(head) + 4))
    assert [ids[p] for p in pos] == [tok.image_placeholder_id] * 4 and all(mask[p] == 0 for p in pos)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "7<|im_end|>"
    with pytest.raises(ValueError, match="text only"):
        tok.render_multimodal(img_msgs, 0)


def test_collate_targets_only_the_answer():
    tok = small_tokenizer()
    exs = [TrainExamples(0)(i) for i in range(4)]
    b = collate(exs, tok, 4, 256, packed=False)
    assert b["images"].shape == (4, 3, 32, 32) and "attn_mask" not in b
    for r, ex in enumerate(exs):
        t = b["targets"][r]
        answers = [m["content"] + "<|im_end|>" for m in ex["messages"] if m["role"] == "assistant"]
        assert tok.decode(t[t >= 0].tolist()) == "".join(answers) and answers[0] == ex["answer"] + "<|im_end|>"
        s = int(b["img_start"][r])
        assert b["idx"][r, s : s + 4].tolist() == [tok.image_placeholder_id] * 4


def test_packed_vision_batch_equals_one_conversation_per_row(tmp_path):
    from chatstack.model import best_fit_rows

    assert best_fit_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # best fit, longest first
    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4, block_size=256)
    ck = load_checkpoint(path)
    m = VisionChatModel(ck.model, load_vision(path)).eval()
    exs = [TrainExamples(3, weights={"where": 1})(i) for i in range(16)]
    alone = collate(exs, ck.tokenizer, 4, 256, packed=False)
    packed = collate(exs, ck.tokenizer, 4, 256, packed=True)
    assert packed["idx"].shape[0] < alone["idx"].shape[0] and packed["idx"].numel() < alone["idx"].numel()
    assert int(packed["n_tokens"]) == int(alone["n_tokens"])
    t_a, t_p = alone["targets"], packed["targets"]
    assert sorted(t_a[t_a >= 0].tolist()) == sorted(t_p[t_p >= 0].tolist())
    # every image lands on its placeholders, in the row its conversation was packed into
    for r, s in zip(packed["img_row"].tolist(), packed["img_start"].tolist()):
        assert packed["idx"][r, s : s + 4].tolist() == [ck.tokenizer.image_placeholder_id] * 4
    # the same loss: positions restart and attention stays inside each conversation
    keys = ["idx", "targets", "images", "img_row", "img_start"]
    _, loss_a = m(*[alone[k] for k in keys])
    logits_p, loss_p = m(*[packed[k] for k in keys], packed["positions"], packed["attn_mask"])
    assert logits_p.shape == (int((t_p >= 0).sum()), ck.model.config.vocab_size)
    assert torch.allclose(loss_a, loss_p, atol=1e-5), (loss_a, loss_p)
    # and without the layout, packing would let conversations read each other: a different loss
    _, loss_leak = m(*[packed[k] for k in keys])
    assert not torch.allclose(loss_a, loss_leak, atol=1e-4)


def test_place_images_matches_a_loop():
    x = torch.randn(3, 10, 8)
    e = torch.randn(2, 4, 8)
    row, start = torch.tensor([2, 0]), torch.tensor([5, 1])
    ref = x.clone()
    for i in range(2):
        for k in range(4):
            ref[row[i], start[i] + k] = e[i, k]
    assert torch.equal(place_images(x, e, row, start), ref)


# ---- the engine takes embeddings at image positions ------------------------------------------------------------
def _tiny_gpt(vocab, block=128):
    torch.manual_seed(0)
    return GPT(get_preset("nano", vocab_size=vocab, block_size=block)).eval()


def test_engine_embeds_equal_a_full_forward():
    tok = small_tokenizer()
    gpt = _tiny_gpt(tok.vocab_size)
    eng = Engine(gpt, tok, max_batch_size=4)
    prompt = tok.encode("The quick brown fox jumps")
    pos = [1, 2, 3]
    val = torch.randn(3, gpt.config.n_embd) * 0.5
    out = eng.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0), embeds=[(pos, val)])[0]
    # reference: greedy decoding with full forwards over the embeddings (no cache)
    ids = list(prompt)
    for _ in range(6):
        x = gpt.tok_emb(torch.tensor([ids]))
        x[0, pos] = val
        with torch.no_grad():
            nxt = int(gpt(torch.tensor([ids]), embeds=x)[0, -1].argmax())
        ids.append(nxt)
        if nxt in (tok.eot_id, tok.im_end_id):
            break
    assert out.token_ids == ids[len(prompt) :]
    # the token embeddings themselves as embeds: the same as no embeds; a batch mixing rows is the same per row
    same = (pos, gpt.tok_emb.weight[torch.tensor(prompt)[pos]].detach())
    plain = eng.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert (
        eng.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0), embeds=[same])[0].token_ids
        == plain.token_ids
    )
    both = eng.generate([prompt, prompt], SamplingParams(max_new_tokens=6, temperature=0), embeds=[(pos, val), None])
    assert [c.token_ids for c in both] == [out.token_ids, plain.token_ids]
    with pytest.raises(ValueError, match="positions"):
        eng.add_request(prompt, embeds=([len(prompt)], val[:1]))


def test_engine_image_rows_skip_the_prefix_cache():
    tok = small_tokenizer()
    gpt = _tiny_gpt(tok.vocab_size)
    eng = Engine(gpt, tok, max_batch_size=4, prefix_cache_mb=8)
    prompt = tok.encode("To be, or not to be")
    a = (torch.tensor([0, 1]), torch.randn(2, gpt.config.n_embd))
    b = (torch.tensor([0, 1]), torch.randn(2, gpt.config.n_embd))
    p = SamplingParams(max_new_tokens=5, temperature=0)
    ref_b = Engine(gpt, tok).generate([prompt], p, embeds=[b])[0].token_ids
    eng.generate([prompt], p, embeds=[a])
    assert eng.generate([prompt], p, embeds=[b])[0].token_ids == ref_b  # not row a's keys/values
    assert eng.prefix_cache.tokens_reused == 0


# ---- checkpoint: the GPT and the vision part side by side ------------------------------------------------------
def test_vision_checkpoint_round_trip(tmp_path):
    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4)
    ck = load_checkpoint(path)  # a text-only tool loads the GPT as before
    ad = load_vision(path)
    assert ck.config["vision"]["image_tokens"] == 4 and ad.image_tokens == 4
    assert (tmp_path / "vis" / "vision.safetensors").exists()
    assert load_vision(make_tiny_vision_checkpoint(tmp_path / "txt", vision=False)) is None
    # re-saving through the wrapper writes the same weights back
    m = VisionChatModel(ck.model, ad)
    save_checkpoint(tmp_path / "again", m, ck.config, ck.tokenizer)
    ad2 = load_vision(tmp_path / "again")
    for (k, v), (k2, v2) in zip(ad.state_dict().items(), ad2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    (tmp_path / "again" / "vision.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="vision.safetensors"):
        load_vision(tmp_path / "again")


def test_render_request_and_eval_answers(tmp_path):
    from chatstack.evals.vision import chat_metrics

    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4)
    ck, ad = load_checkpoint(path), load_vision(path)
    eng = Engine(ck.model.eval(), ck.tokenizer)
    ex = eval_examples(["digits"], 1)[0]
    ids, (pos, emb) = render_request(ck.tokenizer, ad, ex["messages"][:-1], ex["images"])
    assert len(pos) == 4 and emb.shape == (4, ck.model.config.n_embd)
    with pytest.raises(ValueError, match="image"):
        render_request(ck.tokenizer, ad, ex["messages"][:-1], [])
    res = chat_metrics(eng, ad, ["digits", "scene-count"], 3)
    assert set(res["tasks"]) == {"digits", "scene-count"} and res["tasks"]["digits"]["n"] == 3
    z = chat_metrics(eng, ad, ["digits"], 3, zero_images=True)
    assert 0 <= z["tasks"]["digits"]["accuracy"] <= 1


# ---- the commands -----------------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `chatstack ARGS` in this process: (returncode, stdout, stderr)."""

    def run(*args, check=True, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))  # StringIO.isatty() is False: piped mode
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
        if check and rc != 0:
            raise AssertionError(err[-3000:])
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return run


@pytest.mark.slow
def test_clip_train_sft_vision_eval_vision_contract(tmp_path, cli):
    clip = tmp_path / "clip"
    cli(
        "clip-train",
        "--builtin",
        "digits",
        "--out",
        clip,
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--channels",
        "8,8,16",
        "--eval-every",
        "0",
        "--time-budget",
        "0",
        "--no-progress",
    )
    res = json.loads(cli("eval-vision", clip, "--json").stdout)
    assert {"zero_shot_accuracy", "n"} <= set(res) and res["n"] == 359
    base = make_tiny_vision_checkpoint(tmp_path / "base", vision=False)
    vis = tmp_path / "vis"
    cli(
        "sft-vision",
        "--base",
        base,
        "--clip",
        clip,
        "--out",
        vis,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--image-tokens",
        "4",
        "--eval-every",
        "0",
        "--eval-n",
        "2",
        "--time-budget",
        "0",
        "--no-progress",
    )
    res = json.loads(cli("eval-vision", vis, "--json", "--n", "2", "--ablation").stdout)
    assert set(res["tasks"]) == {"digits", "scene-colour", "scene-shape", "scene-count", "scene-position"}
    assert all({"accuracy", "n"} <= set(v) for v in res["tasks"].values())
    assert "ablation_zero_images" in res
    # resume: the GPT and the vision part both come back from the checkpoint
    cli(
        "sft-vision",
        "--base",
        base,
        "--clip",
        clip,
        "--out",
        vis,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--image-tokens",
        "4",
        "--eval-every",
        "0",
        "--eval-n",
        "2",
        "--time-budget",
        "0",
        "--no-progress",
        "--resume",
    )


def test_bad_input_errors(tmp_path, cli):
    r = cli("clip-train", "--out", tmp_path / "c", check=False)
    assert r.returncode != 0 and "--builtin" in r.stderr and "Traceback" not in r.stderr
    r = cli("clip-train", "--builtin", "cats", "--out", tmp_path / "c", check=False)
    assert "unknown dataset 'cats'" in r.stderr
    base = make_tiny_vision_checkpoint(tmp_path / "base", vision=False)
    r = cli("sft-vision", "--base", base, "--clip", base, "--out", tmp_path / "v", check=False)
    assert "not a CLIP checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = cli(
        "sft-vision",
        "--base",
        base,
        "--clip",
        base,
        "--out",
        tmp_path / "v",
        "--question-weights",
        "size=2",
        check=False,
    )
    assert "--question-weights: 'size=2'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "v").exists()
    r = cli("eval-vision", base, "--tasks", "scene-size", check=False)
    assert "unknown task 'scene-size'" in r.stderr and "scene-where" in r.stderr
    r = cli("eval-vision", base, check=False)
    assert "text-only" in r.stderr
    r = cli("chat", base, "--image", tmp_path / "x.png", check=False)
    assert "text-only" in r.stderr and "Traceback" not in r.stderr


def test_chat_image_flag_and_command(tmp_path, cli):
    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4)
    png = tmp_path / "digit.png"
    D.to_pil(D.digits("test")[0][0]).save(png)
    inp = f"What digit is this?\n/image {png}\nAnd this one?\n/image {tmp_path / 'nope.png'}\n"
    r = cli("chat", path, "--image", png, "--max-new-tokens", "3", "--temperature", "0", stdin=inp)
    assert r.returncode == 0, r.stderr
    assert "image attached" in r.stderr and "no such image file" in r.stderr


def test_chat_session_keeps_images_with_their_turns(tmp_path):
    from chatstack.stages.chat import ChatSession

    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4, block_size=64)
    ck, ad = load_checkpoint(path), load_vision(path)
    notes = []
    s = ChatSession(
        Engine(ck.model.eval(), ck.tokenizer),
        SamplingParams(max_new_tokens=4, temperature=0),
        note=notes.append,
        adapter=ad,
    )
    png = tmp_path / "s.png"
    D.to_pil(D.scenes("test", 1, 0)[0].draw()).save(png)
    for _ in range(5):
        s.command(f"/image {png}")
        s.reply("What colour is the circle?")
        # every image part in the kept turns has its image, however many turns the context dropped
        assert sum(s._n_images(t) for t in s.turns) == len(s.images)
    assert any("dropped the oldest turn" in n for n in notes)


def test_estimate_counts_the_image_encoder(tmp_path, cli):
    from chatstack.estimate import vision_params

    path = make_tiny_vision_checkpoint(tmp_path / "vis", image_tokens=4, block_size=64)
    ad = load_vision(path)
    # the formula against the module itself
    assert vision_params(ad.config.to_dict()) == {
        "image_encoder": sum(p.numel() for p in ad.encoder.parameters()),
        "projection": sum(p.numel() for p in ad.projection.parameters()),
    }
    full = VisionAdapter(VisionConfig(n_embd=128))
    assert vision_params(full.config.to_dict())["image_encoder"] == sum(p.numel() for p in full.encoder.parameters())
    res = json.loads(cli("estimate", "--checkpoint", path, "--images", "2", "--json").stdout)
    assert res["vision"]["image_token_share"] == pytest.approx(8 / 64)
    assert res["vision"]["total_params"] == res["params"] + sum(p.numel() for p in ad.parameters())
    assert "image encoder" in cli("estimate", "--checkpoint", path).stdout


@pytest.mark.slow
def test_speedrun_vision_stages_and_report(tmp_path):
    from chatstack.stages.report import write_report
    from chatstack.stages.speedrun import build_report, run_pipeline

    out = tmp_path / "sr"
    make_tiny_vision_checkpoint(out / "sft", vision=False)  # stands in for the speedrun's chat model
    run_pipeline(out, smoke=True, only=["clip-train", "sft-vision", "eval-vision"], vision=True)
    rep = build_report(out)
    write_report(out, rep)
    assert rep["vision"]["grid"] == "vision_examples.png" and (out / "vision_examples.png").stat().st_size > 1000
    assert set(rep["vision"]["eval"]["tasks"]) == {
        "digits",
        "scene-colour",
        "scene-shape",
        "scene-count",
        "scene-position",
    }
    md = (out / "report.md").read_text()
    assert "## Vision (held-out images)" in md and "image tokens zeroed" in md


def test_global_token_is_the_projected_clip_embedding(tmp_path):
    from chatstack.estimate import vision_params

    torch.manual_seed(0)
    ad = VisionAdapter(VisionConfig(clip=TINY_CLIP, n_embd=32, image_tokens=4, global_token=True))
    imgs = torch.rand(3, 3, 32, 32)
    out = ad(imgs)
    assert out.shape == (3, 5, 32) and ad.image_tokens == 5
    emb = F.normalize(ad.encoder.embed(imgs), dim=-1)  # what CLIP compares with captions
    assert torch.allclose(out[:, 0], ad.projection.glob(emb) + ad.projection.pos[0], atol=1e-5)
    assert vision_params(ad.config.to_dict())["projection"] == sum(p.numel() for p in ad.projection.parameters())
    path = make_tiny_vision_checkpoint(tmp_path / "g", image_tokens=4, global_token=True)
    assert load_vision(path).image_tokens == 5


def test_preempted_image_rows_come_back_with_their_images():
    # tests/test_kv_budget.py's setting (a budget of 4 rows x one block forces preemptions), with image embeddings
    from helpers import nano_model

    from chatstack.infer.kv_cache import KV_BLOCK

    tok = small_tokenizer()
    gpt = nano_model("nano-llama", tok.vocab_size, seed=3, block_size=256)
    c = gpt.config
    budget_mb = 4 * KV_BLOCK * c.n_layer * 2 * c.n_kv_head * c.head_dim * 4 / 2**20
    words = ["The quick brown fox", "To be, or not", "What is 12 plus 30?", "héllo wörld", "User asks, then"]
    prompts = [tok.encode(w) for w in words] + [tok.encode("The quick brown fox jumps over the lazy dog again")]
    torch.manual_seed(1)
    embeds = [([0, 1], torch.randn(2, c.n_embd)) for _ in prompts]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[]) for n in [200, 180, 90, 60, 170, 100]
    ]
    small = Engine(gpt, tok, max_batch_size=8, kv_cache_mb=budget_mb)
    got = small.generate(prompts, params, embeds=embeds)
    assert small.preemptions > 0
    ref = Engine(gpt, tok, max_batch_size=8).generate(prompts, params, embeds=embeds)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


def test_every_vision_task_has_its_chance_level():
    from collections import Counter

    from chatstack.stages.eval_vision import CHANCE
    from chatstack.vision.chat_data import AUX_TASKS, TASKS

    assert set(TASKS + AUX_TASKS) <= set(CHANCE)
    # a description's blind guess: the most frequent caption of many random scenes
    rng = random.Random(0)
    counts = Counter(D.random_scene(rng).caption() for _ in range(36_000))
    assert counts.most_common(1)[0][1] / 36_000 == pytest.approx(CHANCE["scene-describe"], rel=0.15)
