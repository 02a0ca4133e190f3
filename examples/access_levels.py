"""Access levels in practice: one model, four handles, and what each may do.

python examples/access_levels.py
"""

import lfm
from lfm.assets import describe, load_model

white = load_model("smollm2-135m")  # a white-box handle: WEIGHTS
print(describe(white)["access"])

prompt = "The Eiffel Tower is located in the city of"
api = lfm.narrow(white, "scores")  # what a scoring API would give
print(api, api.score([prompt] * 2, [" Paris", " Rome"]).tolist())

chat = lfm.narrow(white, "text")  # what a chat API would give
print(chat, chat.generate([prompt], max_new_tokens=6))

for attempt in (
    lambda: lfm.narrow(chat, "scores"),
    lambda: lfm.access.require(api, lfm.Access.WEIGHTS, "edit/rome"),
):
    try:
        attempt()
    except lfm.AccessError as e:
        print("refused:", e)
