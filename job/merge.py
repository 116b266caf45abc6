"""The merge stage (the publishing issue fills this in): adapter + 16-bit base -> OUTPUT_DIR/merged."""


def merge(s) -> dict:
    raise NotImplementedError("merge stage: see the merge/publish issue")
