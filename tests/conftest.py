import os
import pytest
# Tests never reach the Hugging Face hub, and their numbers do not depend on how many threads the
# other tests leave free.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A play in the corpus's format, small enough to read: two acts, speakers, stage directions.
PLAY = """HAMLET

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.

Mar.
And liegemen to the Dane.

[Exit.]

ACT 2
SCENE 1
[Enter PROSPERO and MIRANDA]

MIRANDA.
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.

PROSPERO
Be collected:
No more amazement.

[Exeunt.]
"""

@pytest.fixture(scope="session")
def play() -> str: return PLAY


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    "One `smoke` run folder for the whole session, made through the export stage (own base, SFT and LoRA models)."
    from microlm.config import Run  # here: conftest is imported before any test, and most tests need no run
    from microlm.stages import ensure

    run = Run(tmp_path_factory.mktemp("smoke_run") / "run", "smoke")
    ensure(run, "export", log=lambda line: None)
    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    "Torch on one thread for a module (tiny models, or llama.cpp running beside torch), restored after."
    import torch  # here: conftest stays light for the tests that never touch torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
