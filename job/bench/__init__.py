"""`job bench`: useful tokens per second of the job's training path against stock recipes, on one GPU.

It builds a random-init model of a real architecture (Llama-3-8B by default, or Mistral-7B) and saves it to local
disk, quantizes it once the way the job loads it (NF4, double quantization, bf16 compute) and keeps that copy, and
generates instruction-like rows (lognormal lengths, median ~300 tokens, at most MAX_LENGTH, loss on the answer).
Then, in this one process, each phase loads the quantized model, trains a few warm-up steps and times the next ones:

    job        the job's own path with its defaults: levers chosen by job.speed for this card and memory
    tutorial   what the tutorials do: pad every row to MAX_LENGTH, batch 4, recomputation on, sdpa
    stock      the best stock TRL settings measured here: packing (padding-free), flex_attention, liger,
               no recomputation, batch 4

Each phase reports useful (non-pad) tokens/s, seconds per optimizer step, peak GPU memory (reserved by PyTorch's
allocator; the CUDA context is not counted), and MFU against the card's dense bf16 peak at 4 x parameters FLOP a
useful token (forward, backward into the activations; no weight gradients for frozen weights; recomputation not
counted). `--memory-cap 8,16,24` repeats the comparison as on smaller cards: the allocator is capped, the job plans
within the cap, and stock is the fastest of its recipes that runs under the same cap. Progress goes to stderr, the
table (or `--json`) to stdout.

The package, one concern a module: `recipes` (what is compared), `workload` (model and rows), `phase` (one timed
phase), `checks` (GPU kernel self-checks), `report` (ratios and table), `compare` (`job bench`: every phase),
`longest` (`job bench --max-length max`: the longest sequence that trains, one process per trial).
"""
