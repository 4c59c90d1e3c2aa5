"""Ask one question about one image and stream the answer, with timings.

    python examples/ask_one_image.py MODEL_DIR_OR_ID photo.jpg "What is in the image?"
"""
import sys

import tinyvlm

model, image, question = sys.argv[1], sys.argv[2], " ".join(sys.argv[3:]) or "What is in the image?"
vlm = tinyvlm.load(model, progress=True)
for piece in vlm.generate(question, image=image, max_new_tokens=64, stream=True):
    print(piece, end="", flush=True)
print()
s = vlm.stats
print(f"image encode {s.image_encode_s:.2f} s, prefill {s.prefill_tok_s:.1f} tok/s, decode {s.decode_tok_s:.1f} tok/s",
      file=sys.stderr)
