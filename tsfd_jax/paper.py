"""The paper's reported TSFD-Net numbers (Ilyas et al. 2022), for side-by-side report columns.

Source: PAPER Tables 8-10 and the authors' eval README (docs/evaluation.md). The paper evaluated on
a random per-tissue split against ground truth rebuilt by its own post-processing, so these are
not directly comparable with the official 3-fold protocol (docs/FIDELITY.md).
"""

TISSUE_MPQ = {
    "Adrenal_gland": 0.5223, "Bile-duct": 0.5000, "Bladder": 0.5738, "Breast": 0.5106,
    "Cervix": 0.5204, "Colon": 0.4382, "Esophagus": 0.5438, "HeadNeck": 0.4937,
    "Kidney": 0.5517, "Liver": 0.5079, "Lung": 0.4274, "Ovarian": 0.5253, "Pancreatic": 0.4893,
    "Prostate": 0.5431, "Skin": 0.4354, "Stomach": 0.4871, "Testis": 0.4843, "Thyroid": 0.5154,
    "Uterus": 0.5068,
}
TISSUE_BPQ = {
    "Adrenal_gland": 0.69, "Bile-duct": 0.6284, "Bladder": 0.6773, "Breast": 0.6245,
    "Cervix": 0.6561, "Colon": 0.5370, "Esophagus": 0.6306, "HeadNeck": 0.6277,
    "Kidney": 0.6824, "Liver": 0.6675, "Lung": 0.5941, "Ovarian": 0.6431, "Pancreatic": 0.6241,
    "Prostate": 0.6406, "Skin": 0.6074, "Stomach": 0.6529, "Testis": 0.6435, "Thyroid": 0.6692,
    "Uterus": 0.6204,
}
MPQ = 0.504
BPQ = 0.6377
CLASS_PQ = {"Neoplastic": 0.5724, "Inflammatory": 0.4532, "Connective": 0.4228,
            "Dead": 0.2135, "Epithelial": 0.5663}
# Table 10: detection P/R/F1 and classification F1 per class.
DETECTION = {"P": 0.84, "R": 0.87, "F1": 0.85}
CLASSIFICATION_F1 = {"Neoplastic": 0.65, "Epithelial": 0.57, "Inflammatory": 0.57,
                     "Connective": 0.53, "Dead": 0.43}
