import pytest

from baka.errors import BakaError
from baka.merge.presets import builtin_presets, presets
from baka.merge.weights import parse_weights
from baka.registry import Registry


def test_forms():
    assert parse_weights(0.3) == (0.3,) * 26
    assert parse_weights("0.3") == (0.3,) * 26
    w26 = ",".join(str(i / 25) for i in range(26))
    assert parse_weights(w26) == tuple(i / 25 for i in range(26))
    w25 = ",".join(["1"] * 25)
    assert parse_weights(w25, base=0.2) == (0.2,) + (1.0,) * 25
    assert parse_weights("GRAD_V")[:3] == (0.0, 1.0, 0.9166666667)
    w = parse_weights("ALL_A;IN05=0.3", overrides=["out11=1", "mid=0.7"])
    assert w[6] == 0.3 and w[25] == 1.0 and w[13] == 0.7 and sum(w) == pytest.approx(2.0)


def test_errors():
    with pytest.raises(BakaError, match="need 1, 25 or 26"):
        parse_weights("1,2,3")
    with pytest.raises(BakaError, match="no base alpha"):
        parse_weights(",".join(["1"] * 25))
    with pytest.raises(BakaError, match="did you mean 'GRAD_V'"):
        parse_weights("GRAD_VV")
    with pytest.raises(BakaError, match="unknown block"):
        parse_weights("0.5;IN12=1")


def test_builtin_presets_match_reference():
    reg = builtin_presets()
    assert len(reg) == 38
    assert reg.get("ALL_B") == (1.0,) * 26
    assert reg.get("WRAP08")[:5] == (0, 1, 1, 1, 1) and reg.get("wrap08") == reg.get("WRAP08")
    assert reg.get("SMOOTHSTEP*2")[13] == 1.0


def test_user_preset_file(tmp_path):
    f = tmp_path / "mine.tsv"
    f.write_text("preset_name\tpreset_weights\nMY_OUT\t" + ",".join(["0"] * 14 + ["1"] * 12) + "\n")
    reg = presets((f,))
    assert reg.get("MY_OUT")[14:] == (1.0,) * 12 and "GRAD_V" in reg
    dup = tmp_path / "dup.tsv"
    dup.write_text("GRAD_V\t" + ",".join(["0"] * 26))
    with pytest.raises(BakaError, match="duplicate preset name 'GRAD_V'"):
        presets((dup,))
    bad = tmp_path / "bad.tsv"
    bad.write_text("SHORT\t0,1")
    with pytest.raises(BakaError, match="bad.tsv:1: preset 'SHORT' has 2 weights"):
        presets((bad,))


def test_registry_rejects_duplicates_and_suggests():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha_one")(1)
    with pytest.raises(BakaError, match="duplicate"):
        reg.add("Alpha-One", 2)
    with pytest.raises(BakaError, match="did you mean 'alpha_one'"):
        reg.get("alpha_on")
