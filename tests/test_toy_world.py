import numpy as np

from mindbooth import toy_world


def test_sample_is_deterministic_and_varied():
    a, b = toy_world.sample(3, 12), toy_world.sample(3, 12)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) and c == d for (x, c), (y, d) in zip(a, b))
    other = toy_world.sample(4, 12)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, other))
    assert all(img.size == (64, 64) and cap.startswith(("a photo of a ", "a photo of an ")) for img, cap in a)
    assert len({cap.split()[-1] for _, cap in toy_world.sample(0, 40)}) == len(toy_world.CLASSES)


def test_caption_names_the_drawn_colour():
    item = toy_world.Item("ball", "red", "blue", "plain", 0.5, 0.5, 0.5, 0.3, (100, 100, 100))
    assert item.caption() == "a photo of a red ball"
    assert toy_world.Item("cup", "orange", "red", "dotted", 0, .5, .5, .3, (0, 0, 0)).caption() == "a photo of an orange dotted cup"
    pixels = np.asarray(toy_world.draw(item)).reshape(-1, 3)
    assert (pixels == toy_world.COLOURS["red"]).all(axis=1).sum() > 200  # the ball is mostly red


def test_subject_is_one_instance_in_several_poses():
    shots = toy_world.subject(7, count=4)
    assert len({cap for _, cap in shots}) == 1
    images = [np.asarray(img) for img, _ in shots]
    assert not np.array_equal(images[0], images[1])


def test_sidecar_captions_replace_instance_prompt(tmp_path):
    from mindbooth.data import DreamBoothDataset

    for i, (image, caption) in enumerate(toy_world.sample(1, 2)):
        image.save(tmp_path / f"{i}.png")
        if i == 0:
            (tmp_path / f"{i}.txt").write_text(caption + "\n")
    dataset = DreamBoothDataset(tmp_path, "a photo of sks toy", 64)
    rng = np.random.default_rng(0)
    assert dataset.examples(0, rng)[0][1] == toy_world.sample(1, 2)[0][1]
    assert dataset.examples(1, rng)[0][1] == "a photo of sks toy"


def test_quickstart_subject_images_are_the_toy_world_subject(tmp_path):
    from PIL import Image

    from mindbooth.toy_subject import write_toy_images

    paths = write_toy_images(tmp_path / "subject", count=3, size=48, seed=5)
    expected = toy_world.subject(5, 3, 48)
    assert [p.name for p in paths] == ["toy_00.png", "toy_01.png", "toy_02.png"]
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(img)) for p, (img, _) in zip(paths, expected))
    assert not list((tmp_path / "subject").glob("*.txt"))  # the run's --instance_prompt names them
