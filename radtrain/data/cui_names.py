"""Names of the real UMLS concepts (CUIs) the synthetic demo captions use.

The table does two jobs: :mod:`radtrain.data.synthetic` builds its captions from exactly these
concepts, and prediction code falls back to it when a dataset ships no CUI -> name table.

Every entry is a real UMLS CUI. The names are the UMLS preferred names or the short display
names that clinical vocabularies (DICOM PS3.16 context groups, MeSH) attach to the same CUI. Each
CUI was checked against public code tables (DICOM/UMLS value sets) or against the ROCO radiology
captions in ``../shared/data`` (the CUI co-occurs with the word in nearly every caption that has
it). Concepts whose CUI could not be confirmed were left out, so some terms a caption can use
("PA view", "disc herniation", "consolidation") deliberately have no concept here.
"""

from __future__ import annotations

# Imaging modalities and contrast.
MODALITIES: dict[str, str] = {
    "C0040405": "X-Ray Computed Tomography",
    "C1306645": "Plain x-ray",
    "C0024485": "Magnetic Resonance Imaging",
    "C0041618": "Ultrasonography",
    "C0002978": "Angiogram",
    "C0032743": "Positron-Emission Tomography",
    "C0013516": "Echocardiography",
    "C0024671": "Mammography",
    "C0016356": "Fluoroscopy",
    "C0034606": "Radionuclide Imaging",
    "C0009924": "Contrast Media",
}

# Body regions, organs and bones.
ANATOMY: dict[str, str] = {
    "C0000726": "Abdomen",
    "C0817096": "Chest",
    "C0018670": "Head",
    "C0027530": "Neck",
    "C0030797": "Pelvis",
    "C0024109": "Lung",
    "C0023884": "Liver",
    "C0022646": "Kidney",
    "C0006104": "Brain",
    "C0018787": "Heart",
    "C0037949": "Vertebral column",
    "C0024091": "Lumbar spine",
    "C0728985": "Cervical spine",
    "C0581269": "Thoracic spine",
    "C0022742": "Knee",
    "C0003087": "Ankle joint",
    "C0019552": "Hip",
    "C0037004": "Shoulder",
    "C0015811": "Femur",
    "C0040184": "Tibia",
    "C0020164": "Humerus",
    "C0035561": "Rib",
    "C0037303": "Skull",
    "C0024687": "Mandible",
    "C0037993": "Spleen",
    "C0030274": "Pancreas",
    "C0016976": "Gallbladder",
    "C0005682": "Urinary Bladder",
    "C0003483": "Aorta",
    "C0007272": "Carotid Arteries",
    "C0014876": "Esophagus",
    "C0038351": "Stomach",
    "C0009368": "Colon",
    "C0021852": "Small intestine",
    "C0040132": "Thyroid Gland",
    "C0006141": "Breast",
    "C0033572": "Prostate",
    "C0042149": "Uterus",
    "C0025066": "Mediastinum",
}

# Imaging planes, projections and laterality.
SPATIAL: dict[str, str] = {
    "C0205131": "Axial",
    "C0205123": "Coronal",
    "C0205129": "Sagittal",
    "C0442212": "Antero-posterior",
    "C0205093": "Lateral",
    "C0205090": "Right",
    "C0205091": "Left",
    "C0238767": "Bilateral",
}

# Findings, lesions and diseases.
FINDINGS: dict[str, str] = {
    "C0221198": "Lesion",
    "C0577559": "Mass of body structure",
    "C0027651": "Neoplasms",
    "C0016658": "Fracture",
    "C0010709": "Cyst",
    "C0028259": "Nodule",
    "C0027627": "Neoplasm Metastasis",
    "C0006663": "Calcinosis",
    "C0013604": "Edema",
    "C0019080": "Hemorrhage",
    "C0018944": "Hematoma",
    "C0000833": "Abscess",
    "C1261287": "Stenosis",
    "C0497156": "Lymphadenopathy",
    "C0032227": "Pleural effusion",
    "C0032326": "Pneumothorax",
    "C0031039": "Pericardial effusion",
    "C0002940": "Aneurysm",
    "C0040053": "Thrombosis",
    "C0021308": "Infarction",
    "C0032285": "Pneumonia",
    "C0034065": "Pulmonary Embolism",
    "C0004144": "Atelectasis",
    "C0006267": "Bronchiectasis",
    "C0016059": "Fibrosis",
    "C0041296": "Tuberculosis",
    "C0018800": "Cardiomegaly",
    "C0007097": "Carcinoma",
    "C0024299": "Lymphoma",
    "C0025286": "Meningioma",
    "C0020255": "Hydrocephalus",
    "C0020295": "Hydronephrosis",
    "C0008350": "Cholelithiasis",
    "C0023890": "Liver Cirrhosis",
    "C0030305": "Pancreatitis",
    "C0003615": "Appendicitis",
    "C0012813": "Diverticulitis",
    "C0021843": "Intestinal Obstruction",
    "C0019270": "Hernia",
    "C0003962": "Ascites",
    "C0038002": "Splenomegaly",
    "C0029443": "Osteomyelitis",
}

CUI_NAMES: dict[str, str] = {**MODALITIES, **ANATOMY, **SPATIAL, **FINDINGS}

__all__ = ["ANATOMY", "CUI_NAMES", "FINDINGS", "MODALITIES", "SPATIAL"]
