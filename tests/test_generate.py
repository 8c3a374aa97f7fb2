import numpy as np
import pytest
import torch

from baka.errors import BakaError, ModelFileError
from baka.generate import infotext
from baka.generate.conditioning import PromptEncoder
from baka.generate.embeddings import EmbeddingDB, load_embedding
from baka.generate.engine import Generator, GenParams
from baka.generate.freeu import FreeU, parse_freeu
from baka.generate.samplers import SAMPLERS, build_scheduler
from baka.models.safetensors_io import save_file

P = dict(steps=3, width=64, height=64, seed=11)


@pytest.fixture(scope="module")
def gen(tiny_files):
    return Generator(tiny_files[0], progress=False)


def _pixels(results):
    return np.stack([np.asarray(r.image) for r in results])


def test_plain_prompt_matches_text_encoder(gen):
    te = gen.pipe.text_encoder
    enc = PromptEncoder(te)
    chunk = enc.chunks("a photo of a cat")
    want = te(input_ids=torch.tensor([chunk[0].tokens])).last_hidden_state
    assert torch.equal(enc.encode_chunks(chunk), want)


def test_clip_skip_is_layer_then_final_norm(gen):
    te = gen.pipe.text_encoder
    enc = PromptEncoder(te, clip_skip=2)
    chunk = enc.chunks("a photo of a cat")
    hs = te(input_ids=torch.tensor([chunk[0].tokens]), output_hidden_states=True).hidden_states
    assert torch.allclose(enc.encode_chunks(chunk), te.final_layer_norm(hs[-2]))
    assert not torch.allclose(enc.encode_chunks(chunk), PromptEncoder(te).encode_chunks(chunk))


def test_emphasis_original_keeps_mean(gen):
    enc = PromptEncoder(gen.pipe.text_encoder)
    plain = enc.encode_chunks(enc.chunks("a cat on a mat"))
    weighted = enc.encode_chunks(enc.chunks("a (cat:1.5) on a mat"))
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    assert not torch.allclose(weighted, plain)
    ignore = PromptEncoder(gen.pipe.text_encoder, emphasis="Ignore")
    assert torch.equal(ignore.encode_chunks(ignore.chunks("a (cat:1.5) on a mat")), plain)


def test_emphasis_none_passes_brackets_to_clip(gen):
    from baka.models.tokenizer import tokenize

    none = PromptEncoder(gen.pipe.text_encoder, emphasis="None")
    (chunk,) = none.chunks("a (cat:1.5) BREAK mat")
    n = len(tokenize("a (cat:1.5) BREAK mat"))
    assert chunk.tokens[1 : n + 1] == tokenize("a (cat:1.5) BREAK mat") and set(chunk.weights) == {1.0}
    ignored = PromptEncoder(gen.pipe.text_encoder, emphasis="Ignore")
    assert len(ignored.chunks("a (cat:1.5) BREAK mat")) == 2  # Ignore still parses the syntax


def test_cond_and_uncond_keep_their_lengths(gen):
    enc = PromptEncoder(gen.pipe.text_encoder)
    conds, uncond = enc.conditioning(" ".join(["cat"] * 100), "", 20)
    assert conds[0][0][0][1].shape == (1, 154, 32) and uncond[0][1].shape == (1, 77, 32)


@pytest.mark.parametrize("fmt", ["a1111_pt", "safetensors", "diffusers_bin"])
def test_textual_inversion_formats(gen, tmp_path, fmt):
    vec = torch.randn(2, 32)
    if fmt == "a1111_pt":
        path = tmp_path / "badhands.pt"
        torch.save(
            {
                "string_to_token": {"*": 265},
                "string_to_param": {"*": torch.nn.Parameter(vec)},
                "name": "badhands",
                "step": 100,
            },
            path,
        )
    elif fmt == "safetensors":
        path = save_file({"emb_params": vec}, tmp_path / "badhands.safetensors")
    else:
        path = tmp_path / "badhands.bin"
        torch.save({"<badhands>": vec}, path)
    emb = load_embedding(path, 32)
    assert emb.name == "badhands" and torch.equal(emb.vectors, vec)
    db = EmbeddingDB(32)
    db.add(emb)
    enc = PromptEncoder(gen.pipe.text_encoder, db)
    chunks = enc.chunks("lowres, badhands, blurry")
    ((pos, found),) = chunks[0].fixes
    assert found is emb and chunks[0].tokens[pos : pos + 2] == [0, 0]
    seen = {}
    hook = gen.pipe.text_encoder.get_input_embeddings().register_forward_hook(
        lambda m, i, o: seen.setdefault("out", o)
    )
    try:
        with_emb = enc.encode_chunks(chunks)
    finally:
        hook.remove()
    assert "badhands" in enc.used and with_emb.shape == (1, 77, 32)
    assert not torch.equal(
        with_emb, PromptEncoder(gen.pipe.text_encoder).encode_chunks(enc.chunks("lowres, x, blurry"))
    )


def test_embedding_width_mismatch(tmp_path):
    path = save_file({"emb_params": torch.zeros(1, 1024)}, tmp_path / "sd2emb.safetensors")
    with pytest.raises(ModelFileError, match="sd2emb.safetensors: embedding is 1024 wide .*SD2.* is 768"):
        load_embedding(path, 768)


def test_every_sampler_runs(gen):
    for name in SAMPLERS.names():
        out = gen(GenParams("a cat", sampler=name, **P))
        assert out[0].image.size == (64, 64), name
    with pytest.raises(BakaError, match="did you mean 'DPM\\+\\+ 2M Karras'"):
        SAMPLERS.get("DPM++ 2M Karas")


def test_zero_snr_and_v_pred_scheduler(gen):
    s = build_scheduler("Euler", gen.base_scheduler, zero_snr=True, v_pred=True)
    assert s.config.rescale_betas_zero_snr and s.config.timestep_spacing == "trailing"
    assert s.config.prediction_type == "v_prediction"
    assert s.alphas_cumprod[-1] < 1e-6  # terminal SNR ~ 0 after the fix
    plain = build_scheduler("Euler", gen.base_scheduler)
    assert plain.alphas_cumprod[-1] > 1e-3
    with pytest.raises(BakaError, match="does not support zero terminal SNR"):
        build_scheduler("Heun", gen.base_scheduler, zero_snr=True)


def test_seeds_and_batches(gen):
    a = gen(GenParams("a cat", batch=2, **P))
    b = gen(GenParams("a cat", **{**P, "seed": 12}))
    again = gen(GenParams("a cat", **{**P, "seed": 12}))
    assert [r.seed for r in a] == [11, 12]
    assert np.array_equal(_pixels(b), _pixels(again))  # same seed, same image, bit for bit
    # image 1 of a batch is seed + 1; batched math may round differently by at most one level
    assert np.abs(_pixels(a[1:]).astype(int) - _pixels(b)).max() <= 1
    assert not np.array_equal(_pixels(a[:1]), _pixels(b))


def test_infotext_and_from_png_reproduce(gen, tmp_path):
    p = GenParams(
        "a (cat:1.2), masterpiece",
        "lowres, bad",
        sampler="DPM++ 2M Karras",
        cfg=5.5,
        clip_skip=2,
        guidance_rescale=0.5,
        freeu=parse_freeu("sd1-v2"),
        **P,
    )
    r = gen(p)[0]
    path = r.save(tmp_path / "x.png")
    text = infotext.read_png(path)
    prompt, neg, params = infotext.parse(text)
    assert prompt == p.prompt and neg == p.negative
    assert params["Steps"] == "3" and params["Sampler"] == "DPM++ 2M" and params["CFG scale"] == "5.5"
    assert params["Schedule type"] == "Karras"  # A1111 1.10 writes the pair
    assert params["Seed"] == "11" and params["Size"] == "64x64" and params["Clip skip"] == "2"
    assert params["Model hash"] == gen.model_hash and len(gen.model_hash) == 10
    q = GenParams.from_infotext(text)
    assert q == p.replace(batch=1)
    assert np.array_equal(np.asarray(gen(q)[0].image), np.asarray(r.image))


def test_infotext_quoting_round_trip():
    text = infotext.build("a, b: c", "neg", {"Steps": 20, "Lora hashes": "x: 123, y: 456", "Seed": 1})
    assert 'Lora hashes: "x: 123, y: 456"' in text
    assert infotext.parse(text) == (
        "a, b: c",
        "neg",
        {"Steps": "20", "Lora hashes": "x: 123, y: 456", "Seed": "1"},
    )
    a1111 = (
        "masterpiece, 1girl\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abcdef0123, Model: baka, Clip skip: 2"
    )
    q = GenParams.from_infotext(a1111)
    assert (q.sampler, q.steps, q.seed, q.width, q.height, q.clip_skip) == (
        "DPM++ 2M Karras",
        28,
        42,
        512,
        768,
        2,
    )


def test_freeu_off_is_bit_identical_and_on_changes(gen):
    unet = gen.pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    base = unet(x, 500, ctx).sample
    with FreeU(1.3, 1.4, 0.9, 0.2).apply(unet, 10) as patch:
        assert len(patch.handles) == 10  # 7 resnets see 4C-wide h (b1, s1), 3 see 2C (b2, s2)
        on = unet(x, 500, ctx).sample
        patch.set_step(9)
        assert not torch.equal(unet(x, 500, ctx).sample, base)
    assert not torch.allclose(on, base)
    assert torch.equal(unet(x, 500, ctx).sample, base)  # removed: exactly as before
    with FreeU(1.0, 1.0, 1.0, 1.0, version=1).apply(unet, 10):
        assert torch.equal(unet(x, 500, ctx).sample, base)  # neutral factors change nothing
    with FreeU(start=0.5, stop=0.5).apply(unet, 10):
        assert torch.equal(unet(x, 500, ctx).sample, base)  # empty window: ratio 0


def test_freeu_schedule_ratio():
    f = FreeU(start=0.2, stop=0.8)
    assert [f.schedule_ratio(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    s = FreeU(start=0.2, stop=0.8, smoothness=1.0)
    # before start: k / start; after: 1 + (k - start) / (start - stop), clamped to [0, 1]
    assert [round(s.schedule_ratio(k, 10), 4) for k in range(10)] == [
        0,
        0.5,
        1,
        round(1 - 1 / 6, 4),
        round(1 - 2 / 6, 4),
        0.5,
        round(1 - 4 / 6, 4),
        round(1 - 5 / 6, 4),
        0,
        0,
    ]
    half = FreeU(start=0.2, stop=0.8, smoothness=0.5)
    assert half.schedule_ratio(1, 10) == pytest.approx(0.25)
    assert parse_freeu("1.1,1.2,0.9,0.8,1,0.1,0.9,0.5") == FreeU(1.1, 1.2, 0.9, 0.8, 1, 0.1, 0.9, 0.5)


def test_vae_nan_retry_in_fp32(gen):
    vae = gen.pipe.vae
    vae.to(torch.bfloat16)
    gen.dtype = torch.bfloat16

    def poison(module, inp, out):
        return out * float("nan") if out.dtype != torch.float32 else out

    handle = vae.decoder.conv_out.register_forward_hook(poison)
    try:
        images = gen.decode(torch.randn(1, 4, 8, 8))
    finally:
        handle.remove()
        vae.to(torch.float32)
        gen.dtype = torch.float32
    arr = np.asarray(images[0])
    assert arr.shape == (64, 64, 3) and arr.std() > 0  # a real image, not NaN-black


def test_bad_size(gen):
    with pytest.raises(BakaError, match="multiples of 8"):
        gen(GenParams("a", width=65, height=64, steps=1))


def _low_pass_scale_fft(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The FreeU paper's reference: FFT, scale the 2x2 window around DC, inverse FFT."""
    f = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = f.shape[-2:]
    ch, cw = h // 2, w // 2
    mask = torch.ones(f.shape[-2:], device=x.device)
    mask[max(ch - 1, 0) : ch + 1, max(cw - 1, 0) : cw + 1] = scale
    f = torch.fft.ifftshift(f * mask, dim=(-2, -1))
    return torch.fft.ifftn(f, dim=(-2, -1)).real.to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 9), (1, 2, 1, 5), (1, 1, 16, 4)])
def test_freeu_skip_filter_equals_fft_reference(shape):
    from baka.generate.freeu import _low_pass_scale

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for s in (0.2, 0.9, 1.7):
        assert torch.allclose(_low_pass_scale(x, s), _low_pass_scale_fft(x, s), atol=1e-5)
    assert torch.equal(_low_pass_scale(x, 1.0), x)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2 Karras"])
def test_step_count_follows_the_sampler_loop(gen, sampler):
    seen = []
    gen.on_step = lambda i, n: seen.append((i, n))
    try:
        gen(GenParams("a cat", sampler=sampler, **P))
    finally:
        gen.on_step = None
    total = seen[-1][1]
    assert seen == [(i, total) for i in range(1, total + 1)]
    assert total == (P["steps"] if sampler == "Euler" else 2 * P["steps"] - 1)


def test_interrupt_stops_after_the_current_step(gen):
    calls = []
    handle = gen.pipe.unet.register_forward_hook(lambda *a: calls.append(1))

    def on_step(i, total):
        if i == 3:
            gen.interrupt()

    gen.on_step = on_step
    try:
        r = gen(GenParams("a cat", steps=20, width=64, height=64, seed=1))
    finally:
        gen.on_step = None
        handle.remove()
    assert len(calls) == 3 and r[0].image.size == (64, 64)
    calls.clear()
    handle = gen.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        gen(GenParams("a cat", steps=5, width=64, height=64, seed=1))  # the flag does not outlive the call
    finally:
        handle.remove()
    assert len(calls) == 5
