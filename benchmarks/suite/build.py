"""Build the benchmark suite: three datasets made offline from real media, each through ``mmray data prepare``.

    python benchmarks/suite/build.py --out data/suite                          # 3 datasets x 3,000 rows
    python benchmarks/suite/build.py --out /tmp/suite --rows 300 --only spoken-digits   # a small one

mmray's defaults were chosen on the built-in ``synth`` data; these datasets were not used to choose them.
Every medium is real or rendered by a real tool, and every dataset has the same kind of nuisances a user's
data has (gain, background noise, occlusion, misleading text), with a different structure each:

``digits-photo``   image + text + audio, **one modality carries most of the signal**: a handwritten digit
                   (scikit-learn's bundled UCI digits, 8x8 scans of real handwriting, upscaled, rotated and
                   inked over a crop of a real photo, with gain, noise and in 30% of rows an occluding
                   patch). The text is a real sentence (Debian ``fortunes``) that in 35% of rows ends with a
                   hint ("Looks like a seven.") which is wrong 40% of the time; the audio is a recorded
                   desktop sound (``sound-theme-freedesktop``) unrelated to the label.
``spoken-digits``  image + audio, **two noisy modalities must be combined**: the digit is spoken by
                   ``espeak-ng`` (8 accents x 6 voice variants, several speeds and pitches) over a recorded
                   background sound, with a random gain; the same digit is also written as above. A third
                   of the rows have the image ruined (heavy noise, a large patch), a third have the audio
                   ruined (a louder second speaker saying another digit, background at 0 dB).
``fortune-topics`` text + audio, **30% of rows miss a modality**: which of 10 ``fortunes`` files a real
                   fortune comes from (computers, food, law, ...; 10% of the texts come from another file:
                   misleading), with a voice note of the topic word spoken by ``espeak-ng`` over background
                   sound; 15% of rows have no text and 15% no audio.

Rows are balanced over 10 classes and split 70/15/15 by *source* (a handwritten sample, a synthesised
utterance, a fortune belongs to one split only), so the test rows hold writing, voices and sentences no
training row has. Everything is deterministic from ``--seed``. Per dataset, ``OUT/raw/NAME/`` holds the
media and ``manifest.jsonl`` (with a ``condition`` column saying which nuisance each row got) and
``OUT/NAME/`` the dataset directory ``mmray data prepare`` wrote from it.

Needs: the Debian packages ``espeak-ng sox sound-theme-freedesktop fortunes``
(``apt-get install -y espeak-ng sox sound-theme-freedesktop fortunes``) and scikit-learn
(``pip install scikit-learn``; only for its bundled digits and two sample photos). Runs in one process.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import soundfile as sf
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SAMPLE_RATE = 16000  # every recording is 1 s of 16 kHz mono 16-bit WAV
IMAGE_SIZE = 32
SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
SOUNDS_DIR = "/usr/share/sounds/freedesktop/stereo"
FORTUNES_DIR = "/usr/share/games/fortunes"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOPICS = {  # fortunes file -> the word spoken in the voice note
    "computers": "computers", "education": "education", "food": "food", "law": "law", "love": "love",
    "politics": "politics", "science": "science", "songs-poems": "poetry", "sports": "sports",
    "startrek": "star trek",
}
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]
VARIANTS = ["m1", "m3", "m7", "f1", "f2", "f4"]
UTTERANCES_PER_WORD = 40  # split 28 / 6 / 6 like the rows


# ----------------------------------------------------------------------------- tools and sources
@dataclass(frozen=True)
class Need:
    what: str
    present: Callable[[], bool]
    install: str  # the Debian package (or pip requirement) that provides it


NEEDS = {
    "espeak-ng": Need("espeak-ng (speech)", lambda: shutil.which("espeak-ng") is not None, "espeak-ng"),
    "sox": Need("sox (resampling)", lambda: shutil.which("sox") is not None, "sox"),
    "sounds": Need(f"{SOUNDS_DIR}/*.oga (recorded sounds)", lambda: bool(glob.glob(f"{SOUNDS_DIR}/*.oga")),
                   "sound-theme-freedesktop"),
    "fortunes": Need(f"{FORTUNES_DIR}/<topic> (real sentences)",
                     lambda: all(os.path.isfile(os.path.join(FORTUNES_DIR, t)) for t in TOPICS), "fortunes"),
    "sklearn": Need("scikit-learn (bundled digits and photos)", lambda: _importable("sklearn"), "pip:scikit-learn"),
}


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def check_tools(needs: set[str]) -> None:
    """Exit 2 with the install command when a tool or data package the chosen datasets need is missing."""
    missing = [NEEDS[n] for n in sorted(needs) if not NEEDS[n].present()]
    if not missing:
        return
    debs = sorted(n.install for n in missing if not n.install.startswith("pip:"))
    pips = sorted(n.install[4:] for n in missing if n.install.startswith("pip:"))
    lines = [f"suite build: missing {', '.join(n.what for n in missing)}"]
    if debs:
        lines.append(f"  install the Debian packages: apt-get update && apt-get install -y {' '.join(debs)}")
    if pips:
        lines.append(f"  install into this Python: {sys.executable} -m pip install {' '.join(pips)}")
    print("\n".join(lines), file=sys.stderr)
    sys.exit(2)


def split_pool(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Indices 0..n-1 shuffled and cut 70/15/15: each source item belongs to one split."""
    order = rng.permutation(n)
    a, b = round(n * SPLITS["train"]), round(n * (SPLITS["train"] + SPLITS["val"]))
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled UCI handwritten digits: (1797, 8, 8) in 0..1 and their labels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def load_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (a temple, a flower) as float RGB in 0..1."""
    from sklearn.datasets import load_sample_images

    return [im.astype(np.float32) / 255.0 for im in load_sample_images().images]


def _sox_to_array(src: list[str], stdin: bytes | None = None) -> np.ndarray:
    """Run sox on ``src`` (an input spec) and return 16 kHz mono float32 samples (no dither, repeatable)."""
    out = subprocess.run(["sox", "-R", "-D", *src, "-t", "wav", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-"],
                         input=stdin, capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(out), dtype="float32")
    return x


def load_sounds() -> list[np.ndarray]:
    """Every recorded sound of the freedesktop theme, resampled to 16 kHz mono."""
    return [_sox_to_array([p]) for p in sorted(glob.glob(f"{SOUNDS_DIR}/*.oga"))]


def speak(words: list[str], rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """``UTTERANCES_PER_WORD`` espeak-ng renditions of each word: random accent, voice variant, speed, pitch."""
    out: dict[str, list[np.ndarray]] = {}
    for word in words:
        clips = []
        for _ in range(UTTERANCES_PER_WORD):
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
            speed, pitch = int(rng.integers(120, 221)), int(rng.integers(20, 81))
            wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                                 capture_output=True, check=True).stdout
            clips.append(_sox_to_array(["-t", "wav", "-"], stdin=wav))
        out[word] = clips
    return out


def load_fortunes(topic: str) -> list[str]:
    """The fortunes of one file as single-line sentences of 4 to 80 words."""
    with open(os.path.join(FORTUNES_DIR, topic), encoding="utf-8", errors="replace") as f:
        entries = f.read().split("\n%\n")
    texts = [" ".join(e.split()) for e in entries]
    return [t for t in texts if 4 <= len(t.split()) <= 80]


# ----------------------------------------------------------------------------- rendering
def photo_crop(photos: list[np.ndarray], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random square crop of a random photo, resized to ``size`` (float RGB 0..1)."""
    p = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(48, min(p.shape[:2]) // 2))
    y, x = int(rng.integers(p.shape[0] - side)), int(rng.integers(p.shape[1] - side))
    crop = Image.fromarray((p[y:y + side, x:x + side] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255.0


def render_digit(digit: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator, *, noise: float,
                 patch: int) -> np.ndarray:
    """A 32x32 RGB uint8 image: the 8x8 scan upscaled, rotated, shifted and inked over a photo crop.

    ``noise`` is the Gaussian noise sd (0..1 scale); ``patch`` the side of an occluding photo patch (0: none).
    """
    side = int(rng.integers(18, 27))
    ink = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    canvas.paste(ink, (int(rng.integers(0, IMAGE_SIZE - side + 1)), int(rng.integers(0, IMAGE_SIZE - side + 1))))
    mask = (np.asarray(canvas, dtype=np.float32) / 255.0)[..., None]
    bg = photo_crop(photos, rng)
    colour = rng.uniform(0.0, 0.3, 3) if bg.mean() > 0.5 else rng.uniform(0.7, 1.0, 3)
    alpha = rng.uniform(0.6, 1.0)
    img = bg * (1 - alpha * mask) + colour * alpha * mask
    img = img * rng.uniform(0.6, 1.3) + rng.uniform(-0.1, 0.1)  # gain and offset: exposure
    img = img + rng.normal(0.0, noise, img.shape)
    if patch:
        y, x = (int(v) for v in rng.integers(0, IMAGE_SIZE - patch + 1, 2))
        img[y:y + patch, x:x + patch] = photo_crop(photos, rng, patch)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)) + 1e-8)


def _place(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``clip`` at a random offset in one second (cropped around its middle when longer)."""
    out = np.zeros(SAMPLE_RATE, np.float32)
    if len(clip) >= SAMPLE_RATE:
        start = (len(clip) - SAMPLE_RATE) // 2
        return clip[start:start + SAMPLE_RATE].copy()
    at = int(rng.integers(0, SAMPLE_RATE - len(clip) + 1))
    out[at:at + len(clip)] = clip
    return out


def background(sounds: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One second of a random recorded sound from a random offset, repeated when shorter."""
    s = sounds[int(rng.integers(len(sounds)))]
    reps = int(np.ceil((SAMPLE_RATE * 2) / len(s)))
    s = np.tile(s, reps)
    at = int(rng.integers(0, len(s) - SAMPLE_RATE + 1))
    return s[at:at + SAMPLE_RATE].astype(np.float32)


def mix(speech: list[tuple[np.ndarray, float]], bg: np.ndarray | None, snr_db: float,
        rng: np.random.Generator) -> np.ndarray:
    """Speech clips (each with a relative level) placed in 1 s, a background at ``snr_db`` below the first,
    white noise, and a random overall gain (-30..0 dB of full scale)."""
    y = np.zeros(SAMPLE_RATE, np.float32)
    ref = 0.0
    for clip, level in speech:
        c = _place(clip, rng)
        c = c / _rms(c) * level
        ref = ref or _rms(c)
        y += c
    ref = ref or 0.1
    if bg is not None:
        y += bg / _rms(bg) * ref * 10 ** (-snr_db / 20)
    y += rng.normal(0, ref * rng.uniform(0.01, 0.1), SAMPLE_RATE).astype(np.float32)
    y = y / (np.abs(y).max() + 1e-8) * 10 ** (rng.uniform(-30, 0) / 20)
    return y.astype(np.float32)


# ----------------------------------------------------------------------------- the datasets
Row = dict[str, Any]  # image: uint8 HxWx3 | None, audio: float32 samples | None, text: str | None, condition


class Sources:
    """The real media, loaded once and only when a dataset asks for them."""

    def __init__(self, seed: int):
        self.seed = seed
        self._cache: dict[str, Any] = {}

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._cache:
            t = time.time()
            self._cache[name] = make()
            print(f"  loaded {name} in {time.time() - t:.1f}s", flush=True)
        return self._cache[name]

    def digits(self):
        return self.get("digits", load_digits)

    def photos(self):
        return self.get("photos", load_photos)

    def sounds(self):
        return self.get("sounds", load_sounds)

    def speech(self, name: str, words: list[str]):
        return self.get(f"speech:{name}", lambda: speak(words, np.random.default_rng([self.seed, 99, sum(map(ord, name))])))

    def fortunes(self):
        return self.get("fortunes", lambda: {t: load_fortunes(t) for t in TOPICS})


def _digit_pools(src: Sources, rng: np.random.Generator) -> dict[str, dict[int, np.ndarray]]:
    """split -> class -> indices of handwritten samples (each sample in one split)."""
    images, labels = src.digits()
    pools: dict[str, dict[int, list]] = {s: {c: [] for c in range(10)} for s in SPLITS}
    for split, idx in split_pool(len(labels), rng).items():
        for i in idx:
            pools[split][int(labels[i])].append(int(i))
    return {s: {c: np.array(v) for c, v in p.items()} for s, p in pools.items()}


def _utterance_pools(clips: dict[str, list], rng: np.random.Generator) -> dict[str, dict[str, list]]:
    """split -> word -> its utterances (each utterance in one split)."""
    out: dict[str, dict[str, list]] = {s: {} for s in SPLITS}
    for word, cs in clips.items():
        for split, idx in split_pool(len(cs), rng).items():
            out[split][word] = [cs[i] for i in idx]
    return out


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def digits_photo(src: Sources, rng: np.random.Generator):
    """Image carries the signal; a sometimes-wrong hint in the text; audio unrelated to the label."""
    pools, (images, _), photos, sounds = _digit_pools(src, rng), src.digits(), src.photos(), src.sounds()
    sentences = [s for ss in src.fortunes().values() for s in ss]

    def row(rng: np.random.Generator, label: int, split: str) -> Row:
        patch = int(rng.integers(8, 15)) if rng.random() < 0.3 else 0
        image = render_digit(images[_pick(rng, pools[split][label])], photos, rng, noise=rng.uniform(0.02, 0.08),
                             patch=patch)
        words = _pick(rng, sentences).split()[:25]
        text, condition = " ".join(words), "occluded" if patch else "clean"
        if rng.random() < 0.35:
            wrong = rng.random() < 0.4
            said = int((label + rng.integers(1, 10)) % 10) if wrong else label
            text += f" Looks like a {DIGIT_WORDS[said]}."
            condition += "+wrong-hint" if wrong else "+hint"
        audio = mix([], background(sounds, rng), 0.0, rng)
        return {"image": image, "audio": audio, "text": text, "condition": condition}

    return row, [str(i) for i in range(10)]


def spoken_digits(src: Sources, rng: np.random.Generator):
    """Speech and handwriting of the same digit; each ruined in a third of the rows: combine both."""
    pools, (images, _), photos, sounds = _digit_pools(src, rng), src.digits(), src.photos(), src.sounds()
    speech = _utterance_pools(src.speech("digits", DIGIT_WORDS), rng)

    def row(rng: np.random.Generator, label: int, split: str) -> Row:
        condition = str(rng.choice(["both", "image-ruined", "audio-ruined"]))
        say = [(_pick(rng, speech[split][DIGIT_WORDS[label]]), 1.0)]
        if condition == "audio-ruined":  # a louder second speaker saying another digit, loud background
            other = DIGIT_WORDS[int((label + rng.integers(1, 10)) % 10)]
            say.append((_pick(rng, speech[split][other]), float(rng.uniform(1.5, 3.0))))
            snr = float(rng.uniform(-3, 0))
        else:
            snr = float(rng.uniform(3, 15))
        audio = mix(say, background(sounds, rng), snr, rng)
        if condition == "image-ruined":
            noise, patch = rng.uniform(0.25, 0.4), int(rng.integers(16, 23))
        else:
            noise, patch = rng.uniform(0.04, 0.12), (int(rng.integers(8, 13)) if rng.random() < 0.3 else 0)
        image = render_digit(images[_pick(rng, pools[split][label])], photos, rng, noise=noise, patch=patch)
        return {"image": image, "audio": audio, "text": None, "condition": condition}

    return row, [str(i) for i in range(10)]


def fortune_topics(src: Sources, rng: np.random.Generator):
    """Which fortunes file a sentence comes from, with a spoken topic note; 30% of rows miss one of the two."""
    topics = sorted(TOPICS)
    fortunes = src.fortunes()
    pools = {t: {s: [fortunes[t][i] for i in idx] for s, idx in split_pool(len(fortunes[t]), rng).items()}
             for t in topics}
    speech = _utterance_pools(src.speech("topics", [TOPICS[t] for t in topics]), rng)
    sounds = src.sounds()

    def row(rng: np.random.Generator, label: int, split: str) -> Row:
        topic = topics[label]
        misleading = rng.random() < 0.1
        source = topics[int((label + rng.integers(1, 10)) % 10)] if misleading else topic
        text = " ".join(_pick(rng, pools[source][split]).split()[:40])
        audio = mix([(_pick(rng, speech[split][TOPICS[topic]]), 1.0)], background(sounds, rng),
                    float(rng.uniform(-3, 12)), rng)
        condition = "misleading-text" if misleading else "both"
        r = rng.random()
        if r < 0.15:
            text, condition = None, "no-text"
        elif r < 0.30:
            audio, condition = None, "no-audio"
        return {"image": None, "audio": audio, "text": text, "condition": condition}

    return row, topics


@dataclass(frozen=True)
class Spec:
    make: Callable
    modalities: tuple[str, ...]
    structure: str
    needs: frozenset


DATASETS = {
    "digits-photo": Spec(digits_photo, ("image", "text", "audio"), "one modality (image) carries most of the signal",
                         frozenset({"sklearn", "sox", "sounds", "fortunes"})),
    "spoken-digits": Spec(spoken_digits, ("image", "audio"), "two noisy modalities must be combined",
                          frozenset({"sklearn", "sox", "sounds", "espeak-ng"})),
    "fortune-topics": Spec(fortune_topics, ("text", "audio"), "30% of rows miss a modality",
                           frozenset({"sox", "sounds", "espeak-ng", "fortunes"})),
}


# ----------------------------------------------------------------------------- writing
def _wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def write_raw(name: str, raw: str, rows: int, seed: int, src: Sources) -> str:
    """Render ``rows`` rows of dataset ``name`` into ``raw`` (media files + manifest.jsonl); returns the manifest."""
    spec = DATASETS[name]
    rng = np.random.default_rng([seed, list(DATASETS).index(name)])
    row, classes = spec.make(src, rng)
    os.makedirs(os.path.join(raw, "media"), exist_ok=True)
    records = []
    for split, frac in SPLITS.items():
        n = round(rows * frac) if split != "test" else rows - round(rows * SPLITS["train"]) - round(rows * SPLITS["val"])
        labels = rng.permutation(np.arange(n) % len(classes))
        for i, label in enumerate(labels):
            rid = f"{split}-{i:05d}"
            r = row(rng, int(label), split)
            rec = {"id": rid, "label": classes[label], "split": split, "condition": r["condition"]}
            if "image" in spec.modalities:
                rec["image"] = None
                if r["image"] is not None:
                    rec["image"] = f"media/{rid}.png"
                    Image.fromarray(r["image"]).save(os.path.join(raw, rec["image"]))
            if "audio" in spec.modalities:
                rec["audio"] = None
                if r["audio"] is not None:
                    rec["audio"] = f"media/{rid}.wav"
                    with open(os.path.join(raw, rec["audio"]), "wb") as f:
                        f.write(_wav_bytes(r["audio"]))
            if "text" in spec.modalities:
                rec["text"] = r["text"]
            records.append(rec)
    manifest = os.path.join(raw, "manifest.jsonl")
    with open(manifest, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return manifest


def prepare_command(manifest: str, out: str) -> list[str]:
    """``mmray data prepare`` as a user runs it (one worker process: the suite builds on a shared box)."""
    return [sys.executable, "-m", "mmray.cli.main", "data", "prepare", manifest, "--out", out,
            "--split-col", "split", "--workers", "1"]


def build(name: str, out: str, rows: int, seed: int, src: Sources) -> str:
    dest = os.path.join(out, name)
    raw = os.path.join(out, "raw", name)
    for path in (dest, raw):
        if os.path.exists(path):
            shutil.rmtree(path)
    t = time.time()
    print(f"{name}: {DATASETS[name].structure}; rendering {rows} rows", flush=True)
    manifest = write_raw(name, raw, rows, seed, src)
    print(f"  rendered in {time.time() - t:.1f}s: {manifest}", flush=True)
    cmd = prepare_command(manifest, dest)
    print("  $ mmray " + " ".join(cmd[3:]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        print(f"suite build: mmray data prepare failed for {name} (exit {rc})", file=sys.stderr)
        sys.exit(rc)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the dataset directories (and raw/ media)")
    ap.add_argument("--rows", type=int, default=3000, help="rows per dataset (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=list(DATASETS), help="build only this dataset (repeatable)")
    args = ap.parse_args(argv)
    if args.rows < 60:
        ap.error(f"--rows: {args.rows} is too few; at least 60 (10 classes x 3 splits x 2)")
    names = args.only or list(DATASETS)
    check_tools(set().union(*(DATASETS[n].needs for n in names)))
    src = Sources(args.seed)
    for name in names:
        build(name, args.out, args.rows, args.seed, src)
    print(f"built {', '.join(names)} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
