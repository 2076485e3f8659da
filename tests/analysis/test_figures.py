import pytest

from eightbit.analysis.figures import check_png, pyplot, save_png


def test_save_png_writes_a_real_image(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar(["a", "b", "c"], [3, 1, 2])
    ax.set(xlabel="layer", ylabel="SQNR (dB)", title="test")
    path = save_png(fig, tmp_path / "sub" / "bars.png")
    width, height = check_png(path)
    assert width > 100 and height > 100
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["bars.png"]  # no temporary file left


def test_check_png_rejects_non_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png" * 1000)
    with pytest.raises(ValueError, match="not a readable PNG"):
        check_png(bad)
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="bytes"):
        check_png(tiny)
