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
