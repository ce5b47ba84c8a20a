"""Synthetic BraTS 2020-like cohorts built on real anatomy, for when BraTS itself cannot be downloaded.

A cohort draws from a wide distribution rather than one look: every case is its own scanner (contrasts,
gamma, bias field, blur, noise), has its own non-tumour findings that a model must leave alone (FLAIR-bright
white-matter lesions and periventricular caps; T1ce-bright vessels, choroid plexus and dural sinuses), and is
one of the tumour kinds of :data:`KINDS` in the shares of :data:`KIND_DECK`, tumour-free brains included.

- :mod:`.anatomy`: the MNI152 templates from nilearn's package data (no download), warped per case, and
  the landmarks where findings go;
- :mod:`.tumours`: case kinds and tumour growth; :mod:`.findings`: non-tumour findings;
- :mod:`.cases`: one case (:func:`synthesize`, :func:`make_case`); :mod:`.dataset`: cohorts on disk
  (:func:`generate_dataset`) with ``name_mapping.csv`` recording each case's grade and kind;
  :mod:`.dicom_study`: the same cases as DICOM MR studies.

Everything is deterministic given the seed, and case ``i`` of a dataset uses :func:`case_seed` ``(seed, i)``
and :func:`kind_of_case` ``(seed, i)``, so any case can be regenerated alone. From the command line:
``python -m training synth OUT [--cases 10] [--layout brats2020|msd] [--seed 0] [--size 240,240,155]
[--spacing 1,1,1] [--start-index 1] [--format nifti|dicom|both]``.
"""

from training.data.synthetic.anatomy import case_seed, grid_affine
from training.data.synthetic.cases import FINDING_NAMES, INTENSITIES, TISSUE_CLASSES, SyntheticCase, make_case, synthesize
from training.data.synthetic.dataset import BRATS_DIR, LAYOUTS, MSD_DIR, NAME_MAPPING, generate_dataset
from training.data.synthetic.tumours import GRADES, KIND_DECK, KINDS, kind_of_case

__all__ = [
    "BRATS_DIR", "FINDING_NAMES", "GRADES", "INTENSITIES", "KINDS", "KIND_DECK", "LAYOUTS", "MSD_DIR", "NAME_MAPPING",
    "TISSUE_CLASSES", "SyntheticCase", "case_seed", "generate_dataset", "grid_affine", "kind_of_case", "make_case",
    "synthesize",
]
