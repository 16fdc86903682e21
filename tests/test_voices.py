"""Voice files and the voice directory: round trips, names that cannot escape, clear errors."""

import threading
from pathlib import Path

import pytest
import torch

from fastcsm.speech.voices import Voice, VoiceError, VoiceStore, check_name, load_voice, voice_dir


def voice(frames=12, seed=0, speaker=3):
    codes = torch.randint(0, 2048, (frames, 32), generator=torch.Generator().manual_seed(seed))
    return Voice(speaker, "Words of the reference recording.", codes, meta={"source": "ref.wav"})


def test_voice_file_round_trip(tmp_path):
    v = voice()
    path = v.save(tmp_path / "v.safetensors")
    w = Voice.load(path)
    assert torch.equal(w.codes, v.codes) and w.codes.dtype == torch.long
    assert (w.speaker, w.text, w.meta) == (v.speaker, v.text, v.meta)
    assert path.stat().st_size < 12 * 32 * 8 + 2048, "a voice file is codes plus a little metadata"
    seg = w.segment(speaker=1)
    assert (seg.speaker, seg.text, seg.audio) == (1, v.text, None) and torch.equal(seg.codes, v.codes)


def test_store_add_list_get_remove(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    assert store.names() == []
    store.add(voice(seed=1), "alice")
    store.add(voice(seed=2), "bob.v2")
    assert store.names() == ["alice", "bob.v2"]
    assert "alice" in store and store.get("alice").name == "alice"
    with pytest.raises(VoiceError, match="already exists"):
        store.add(voice(), "alice")
    store.add(voice(seed=3), "alice", overwrite=True)
    assert torch.equal(store.get("alice").codes, voice(seed=3).codes)
    store.remove("bob.v2")
    assert store.names() == ["alice"]
    with pytest.raises(VoiceError, match="no voice named 'bob.v2'.*known: alice"):
        store.get("bob.v2")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 65, "a b", "name\x00", "c:\\x"])
def test_names_cannot_escape_the_directory(tmp_path, name):
    with pytest.raises(VoiceError, match="invalid voice name"):
        VoiceStore(tmp_path).path(name)
    assert check_name("ok-Name_1.v2") == "ok-Name_1.v2"


def test_load_by_name_or_path_and_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCSM_VOICES", str(tmp_path / "env"))
    assert voice_dir() == tmp_path / "env"
    VoiceStore().add(voice(seed=4), "carol")
    assert torch.equal(load_voice("carol").codes, voice(seed=4).codes)
    path = voice(seed=5).save(tmp_path / "loose.safetensors")
    assert torch.equal(load_voice(str(path)).codes, voice(seed=5).codes)


def test_unreadable_voice_files_say_so(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a voice at all")
    with pytest.raises(VoiceError, match="not a readable fastcsm voice"):
        Voice.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(VoiceError, match="not a fastcsm voice"):
        Voice.load(tmp_path / "model.safetensors")
    with pytest.raises(VoiceError, match="no voice file"):
        Voice.load(tmp_path / "missing.safetensors")


def test_bad_voices_are_refused():
    with pytest.raises(ValueError, match="empty"):
        Voice(0, "  ", torch.zeros(3, 32, dtype=torch.long))
    with pytest.raises(VoiceError, match="integers"):
        Voice(0, "text", torch.zeros(3, 32))
    with pytest.raises(VoiceError, match="non-empty"):
        Voice(0, "text", torch.zeros(0, 32, dtype=torch.long))


def at_once(*calls) -> list:
    """Each call in a thread of its own, all released together: their results (or exceptions)."""
    barrier, out = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            out[i] = call()
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_a_remove_or_load_that_loses_a_race_with_a_remove_hears_no_voice(tmp_path):
    """The file may go between any check and its use: a remove that loses is "no voice", as is
    a load (never "not readable", which would call the voice damaged)."""
    store = VoiceStore(tmp_path)
    for _ in range(100):
        store.add(voice(), "v", overwrite=True)
        out = at_once(lambda: store.remove("v"), lambda: store.remove("v"), lambda: store.get("v"),
                      lambda: Voice.load(store.path("v")))
        assert sum(isinstance(o, Path) for o in out[:2]) == 1, out
        for o in out:
            assert isinstance(o, (Path, Voice)) or isinstance(o, VoiceError) and "no voice" in str(o), repr(o)


def test_new_voices_never_take_a_speaker_ids_name(tmp_path):
    store = VoiceStore(tmp_path)
    for name in ("007", "12"):
        with pytest.raises(VoiceError, match="digits alone already mean that speaker id"):
            store.add(voice(), name)
    store.add(voice(), "007a")
    assert store.names() == ["007a"]
