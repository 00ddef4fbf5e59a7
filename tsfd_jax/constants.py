"""Class and tissue names and their orders: the single source of truth.

PanNuke masks hold one instance-id channel per nucleus class (channels 0..4) and a background
channel (5). Inside the project labels are ``PanNuke channel + 1`` with 0 = background, which is
HoVer-Net's order (docs/evaluation.md). TSFD's own order (5 = neoplastic) is never used.
"""

# The 19 tissue names exactly as written in PanNuke's types.npy; np.unique order (§8.2).
PANNUKE_TISSUES: tuple[str, ...] = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus",
    "HeadNeck", "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin",
    "Stomach", "Testis", "Thyroid", "Uterus",
)

# Nucleus classes in PanNuke mask-channel order (channels 0..4).
PANNUKE_CLASSES: tuple[str, ...] = (
    "Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial",
)
PANNUKE_BACKGROUND_CHANNEL = 5

# Project label order: 0 background, then PanNuke channel + 1.
BACKGROUND = "Background"
LABEL_NAMES: tuple[str, ...] = (BACKGROUND,) + PANNUKE_CLASSES

# Colours (RGB) per nucleus class for overlays and QuPath, in PanNuke channel order.
PANNUKE_CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),      # Neoplastic: red
    (0, 255, 0),      # Inflammatory: green
    (0, 0, 255),      # Connective: blue
    (255, 255, 0),    # Dead: yellow
    (255, 128, 0),    # Epithelial: orange
)

# PanNuke is scanned at 40x; about 0.25 micrometres per pixel.
PANNUKE_MPP = 0.25
PANNUKE_TILE = 256

