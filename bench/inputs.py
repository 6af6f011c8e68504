"""Real benchmark inputs: scikit-image's sample photos as JPEG, and English sentences.

The photos are what a user uploads (camera-sized JPEGs, not pre-cropped tensors), so every
system pays for decode + resize + crop. The sentences are ordinary prose of 6–30 words,
the length of search queries and product descriptions that embedding services see.
"""

from __future__ import annotations

import io

#: scikit-image sample photos used as image inputs (all RGB; sizes 300×451 to 512×512).
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")

#: Real English sentences (written for this benchmark), cycled through by the load generator.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A cup of coffee on a wooden table next to an open notebook.",
    "The rocket lifted off from the launch pad just after sunrise.",
    "Our cat spends most of the afternoon asleep on the windowsill.",
    "Please send me the quarterly report before the meeting on Friday.",
    "The museum opens at nine and closes early on public holidays.",
    "Heavy rain is expected across the northern region tonight.",
    "She learned to play the piano when she was seven years old.",
    "The new train line cuts the commute between the two cities in half.",
    "How do I reset my password if I no longer have access to my email?",
    "This recipe needs two eggs, a cup of flour and a pinch of salt.",
    "The library lends laptops to students for up to two weeks.",
    "Scientists observed a distant galaxy that formed soon after the big bang.",
    "The shop on the corner sells fresh bread every morning.",
    "Running a marathon takes months of steady training and rest.",
    "The battery lasts about ten hours of video playback on a single charge.",
    "Astronauts aboard the station ran experiments on plant growth in orbit.",
    "Traffic was slow on the bridge because one lane was closed for repairs.",
    "The committee approved the budget after a long debate.",
    "He fixed the leaking tap with a new washer and a wrench.",
    "Children gathered around the storyteller in the village square.",
    "The hotel room had a view of the harbour and the old lighthouse.",
    "Machine learning models need careful evaluation on data they have not seen.",
    "The orchestra rehearsed the symphony twice before the concert.",
    "Where can I find a vegetarian restaurant that is open late near the station?",
    "Farmers harvested the wheat before the storm arrived.",
    "The software update fixes a bug that drained the battery overnight.",
    "A small boat drifted slowly across the calm lake at dusk.",
    "The court ruled that the contract was valid and binding on both parties.",
    "My grandmother grows tomatoes, beans and herbs in her garden.",
    "The airline cancelled several flights because of the snowstorm.",
    "Reading before bed helps many people fall asleep more easily.",
)


def photo_jpegs(quality: int = 90) -> dict[str, bytes]:
    """The sample photos encoded as JPEG (Pillow, ``quality``), name → bytes."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="JPEG", quality=quality)
        out[name] = buf.getvalue()
    return out
