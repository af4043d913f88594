"""The `pretrained` learner: published SAEs (Gemma Scope, SAELens and sparsify folders, dictlab folders such as
`dictlab import` writes) imported as rows of the comparison: each is saved into the run's dictionaries
folder and evaluated like the others."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from dictlab.data import distributed
from dictlab.data.io import sha256_file
from dictlab.data.store import Store
from dictlab.dictionaries.formats import load_sae
from dictlab.dictionaries.learner import Learner
from dictlab.errors import DictlabError

log = logging.getLogger(__name__)


class PretrainedFit(Learner):
    """Published SAEs (Gemma Scope, SAELens and sparsify folders, dictlab folders), imported as rows of the
    comparison."""

    method: Literal["pretrained"] = "pretrained"
    seeded = False  # imported as published
    site: str = Field(description="the site the SAEs read (and, without target_site, reconstruct)")
    target_site: str | None = Field(None, description="for transcoders: the site they reconstruct")
    sources: list[str] = Field(min_length=1, description="each: hub:OWNER/REPO/PATH, a params.npz, or a folder "
                                                            "(dictlab, SAELens or sparsify)")
    required: bool = Field(False, description="fail when a source cannot be loaded (default: skip it, warning)")

    def sizes(self) -> list[str]:
        return self.sources

    def folder(self, source: str) -> str:
        tail = "-".join(Path(source.removeprefix("hub:")).parts[-3:]).removesuffix(".npz")
        return "pretrained-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", tail)

    def fit_entry(self, store: Store, site: str, out: Path, progress: bool = True, eval_only: bool = False,
                  suffix: str = "", world: distributed.World | None = None) -> list[Path]:
        """Save each published SAE into the dictionaries folder, so it is evaluated like the others. A source
        that cannot be loaded (no hub, say) is skipped with a warning unless the entry is `required`. Under
        torchrun, rank 0 imports them."""
        if not distributed.is_main(world):
            return []
        folders = []
        for source in self.sources:
            folder = out / site / self.folder_name(source)
            inputs = self.missing_inputs(store, site, source, folder, eval_only)
            if inputs is None:
                folders.append(folder)
                continue
            try:
                sae = load_sae(source)
            except DictlabError as e:
                if self.required:
                    raise
                log.warning("skipping pretrained SAE %s: %s", source, e)
                continue
            widths = ((site, sae.d_in), (self.target_site or site, sae.d_model))
            for s, width in widths:
                if width != store.d_model(s):
                    raise DictlabError(f"pretrained SAE {source} has width {width} at {s}, the store "
                                       f"{store.d_model(s)}")
            extra = {"inputs": inputs, "site": site, "source": source, "source_sha256": sha256_file(sae.source_file)}
            if self.target_site:
                extra["target_site"] = self.target_site
            sae.save(folder, extra=extra)
            folders.append(folder)
        return folders
