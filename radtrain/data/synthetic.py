"""Deterministic synthetic radiology captions with UMLS CUI labels, for the offline demo and tests.

Why this exists: the real caption sets (ROCO, ROCOv2) may not be redistributed with the project,
and the demo and the tests must run without network access. So the project writes its own small
data set in the same layout as the real one: JSON lines with ``image_id``, ``caption``, ``cui``
(a list of CUI strings) and ``license``, split into ``train``/``validation``/``test`` files.

How it is made: captions are composed from modality, body region, plane/projection, laterality and
finding phrases with templates and synonyms ("CT" / "computed tomography" / "CT scan", "MRI" /
"MR image" / "magnetic resonance imaging", "radiograph" / "X-ray" / "plain film"), optional
extra findings, panel labels, sizes and vertebral levels. Concept frequencies are long-tailed like
the real data (CT, chest and lesions are common; bronchiectasis or osteomyelitis are rare) and the
lengths are ROCO-like (about 20 words on average, a few multi-panel captions up to about 80).

Labels: a caption's ``cui`` list is what :func:`extract_cuis` finds in its text, a dictionary
matcher over the surface forms in :data:`SURFACE_FORMS` (every real CUI in
:mod:`radtrain.data.cui_names`). It works like the automatic concept extractor that labelled ROCO,
but without its noise: the same words always give the same labels, so a small model can learn the
task in a couple of epochs. Words with no concept here ("PA view", "consolidation") stay unlabelled.

Everything is a pure function of ``(n, seed)``: the generator uses its own ``random.Random(seed)``,
never the global RNG, and the written files are byte-identical from run to run.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radtrain.data.cui_names import CUI_NAMES
from radtrain.io import write_text

__all__ = ["LICENSE", "SURFACE_FORMS", "extract_cuis", "generate_captions", "write_dataset"]

LICENSE = "CC0 (synthetic)"

# ---------------------------------------------------------------------------------------------
# Lexicon: CUI -> the surface forms that mention it. Matching is whole-word; forms written in
# capitals (CT, MR, MRI, PET, AP) are matched case-sensitively, all others case-insensitively.
# Overlaps are all kept: "lumbar spine" is Lumbar spine and Vertebral column ("spine"), "PET/CT"
# is PET and CT, "pulmonary embolism" is Pulmonary Embolism and Lung ("pulmonary").
# ---------------------------------------------------------------------------------------------
SURFACE_FORMS: dict[str, tuple[str, ...]] = {
    # modalities
    "C0040405": ("CT", "computed tomography"),
    "C1306645": ("radiograph", "radiographs", "radiography", "X-ray", "plain film"),
    "C0024485": ("MRI", "MR", "magnetic resonance imaging", "magnetic resonance"),
    "C0041618": ("ultrasound", "ultrasonography", "sonography", "sonogram"),
    "C0002978": ("angiography", "angiogram"),
    "C0032743": ("PET", "positron emission tomography"),
    "C0013516": ("echocardiography", "echocardiogram"),
    "C0024671": ("mammography", "mammogram", "mammographic"),
    "C0016356": ("fluoroscopy", "fluoroscopic"),
    "C0034606": ("scintigraphy", "radionuclide scan", "bone scan"),
    "C0009924": ("contrast",),
    # anatomy
    "C0000726": ("abdomen", "abdominal"),
    "C0817096": ("chest", "thorax"),
    "C0018670": ("head",),
    "C0027530": ("neck",),
    "C0030797": ("pelvis", "pelvic"),
    "C0024109": ("lung", "lungs", "pulmonary"),
    "C0023884": ("liver", "hepatic"),
    "C0022646": ("kidney", "kidneys", "renal"),
    "C0006104": ("brain", "cerebral"),
    "C0018787": ("heart", "cardiac"),
    "C0037949": ("spine", "spinal", "vertebral column", "vertebral"),
    "C0024091": ("lumbar spine",),
    "C0728985": ("cervical spine",),
    "C0581269": ("thoracic spine",),
    "C0022742": ("knee",),
    "C0003087": ("ankle", "ankle joint"),
    "C0019552": ("hip",),
    "C0037004": ("shoulder",),
    "C0015811": ("femur", "femoral"),
    "C0040184": ("tibia", "tibial"),
    "C0020164": ("humerus", "humeral"),
    "C0035561": ("rib", "ribs"),
    "C0037303": ("skull",),
    "C0024687": ("mandible", "mandibular"),
    "C0037993": ("spleen", "splenic"),
    "C0030274": ("pancreas", "pancreatic"),
    "C0016976": ("gallbladder",),
    "C0005682": ("bladder", "urinary bladder"),
    "C0003483": ("aorta", "aortic"),
    "C0007272": ("carotid", "carotid artery", "carotid arteries"),
    "C0014876": ("esophagus", "esophageal"),
    "C0038351": ("stomach", "gastric"),
    "C0009368": ("colon", "colonic"),
    "C0021852": ("small bowel", "small intestine"),
    "C0040132": ("thyroid", "thyroid gland"),
    "C0006141": ("breast",),
    "C0033572": ("prostate",),
    "C0042149": ("uterus", "uterine"),
    "C0025066": ("mediastinum", "mediastinal"),
    # planes, projections, laterality
    "C0205131": ("axial",),
    "C0205123": ("coronal",),
    "C0205129": ("sagittal",),
    "C0442212": ("anteroposterior", "AP"),
    "C0205093": ("lateral",),
    "C0205090": ("right",),
    "C0205091": ("left",),
    "C0238767": ("bilateral", "bilaterally"),
    # findings
    "C0221198": ("lesion", "lesions"),
    "C0577559": ("mass", "masses"),
    "C0027651": ("tumor", "tumors", "tumour", "neoplasm"),
    "C0016658": ("fracture", "fractures"),
    "C0010709": ("cyst", "cysts"),
    "C0028259": ("nodule", "nodules"),
    "C0027627": ("metastasis", "metastases", "metastatic"),
    "C0006663": ("calcification", "calcifications"),
    "C0013604": ("edema", "oedema"),
    "C0019080": ("hemorrhage", "haemorrhage", "bleeding"),
    "C0018944": ("hematoma", "haematoma"),
    "C0000833": ("abscess", "abscesses"),
    "C1261287": ("stenosis",),
    "C0497156": ("lymphadenopathy",),
    "C0032227": ("pleural effusion", "pleural effusions"),
    "C0032326": ("pneumothorax",),
    "C0031039": ("pericardial effusion",),
    "C0002940": ("aneurysm", "aneurysms"),
    "C0040053": ("thrombosis",),
    "C0021308": ("infarction", "infarct", "infarcts"),
    "C0032285": ("pneumonia",),
    "C0034065": ("pulmonary embolism", "pulmonary emboli"),
    "C0004144": ("atelectasis",),
    "C0006267": ("bronchiectasis",),
    "C0016059": ("fibrosis",),
    "C0041296": ("tuberculosis",),
    "C0018800": ("cardiomegaly",),
    "C0007097": ("carcinoma",),
    "C0024299": ("lymphoma",),
    "C0025286": ("meningioma",),
    "C0020255": ("hydrocephalus",),
    "C0020295": ("hydronephrosis",),
    "C0008350": ("cholelithiasis", "gallstones"),
    "C0023890": ("cirrhosis",),
    "C0030305": ("pancreatitis",),
    "C0003615": ("appendicitis",),
    "C0012813": ("diverticulitis",),
    "C0021843": ("bowel obstruction", "intestinal obstruction"),
    "C0019270": ("hernia",),
    "C0003962": ("ascites",),
    "C0038002": ("splenomegaly",),
    "C0029443": ("osteomyelitis",),
}


_WORD = re.compile(r"\w+")


def _compile_lexicon() -> dict[str, list[tuple[re.Pattern[str], str]]]:
    """Whole-word pattern per surface form, indexed by the form's first word (lower case)."""
    index: dict[str, list[tuple[re.Pattern[str], str]]] = {}
    for cui, forms in SURFACE_FORMS.items():
        for form in forms:
            flags = 0 if form.isupper() else re.IGNORECASE
            pattern = re.compile(r"(?<!\w)" + re.escape(form) + r"(?!\w)", flags)
            index.setdefault(_WORD.findall(form)[0].lower(), []).append((pattern, cui))
    return index


_LEXICON = _compile_lexicon()


def extract_cuis(text: str) -> list[str]:
    """Sorted unique CUIs whose surface forms occur in ``text`` as whole words.

    This is the labelling function of the synthetic data: ``record["cui"] ==
    extract_cuis(record["caption"])`` holds for every generated record.
    """
    found: set[str] = set()
    for word in sorted(set(_WORD.findall(text.lower()))):
        for pattern, cui in _LEXICON.get(word, ()):
            if pattern.search(text):
                found.add(cui)
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Generator vocabulary. Weights make the concept frequencies long-tailed.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    key: str
    nouns: tuple[str, ...]  # used as "of the {noun}"
    adjs: tuple[str, ...]  # used as "{adj} CT"; empty -> the noun is used
    group: str
    weight: float
    paired: bool = False
    sites: tuple[str, ...] = ()  # sub-locations for findings ("in segment VII of the liver")


@dataclass(frozen=True)
class _Finding:
    key: str
    singular: tuple[str, ...]
    plural: tuple[str, ...]  # empty -> uncountable ("ascites", "edema")
    where: tuple[str, ...]  # region keys or region groups it occurs in
    weight: float
    sided: bool = False  # takes "left"/"right"/"bilateral" itself ("right-sided pneumothorax")
    sized: bool = False  # takes a size ("a 2.3 cm mass", "measuring 3.1 x 2.4 cm")


@dataclass(frozen=True)
class _Modality:
    key: str
    nouns: tuple[tuple[str, float], ...]
    groups: tuple[tuple[str, float], ...]
    weight: float
    views: tuple[tuple[str, float], ...] = ()
    regions: tuple[str, ...] = ()  # restrict to these region keys (empty: any in the groups)
    findings: tuple[str, ...] = ()  # restrict to these finding keys (empty: any that fits the region)


# Region groups are upper case, region keys lower case; "where" tuples and "@" tags may use both.
_REGIONS: tuple[_Region, ...] = (
    _Region("chest", ("chest", "thorax"), ("chest",), "CHEST", 7.0),
    _Region("lung", ("lung", "lungs"), ("lung",), "CHEST", 3.0, paired=True,
            sites=("in the right upper lobe", "in the left upper lobe", "in the right lower lobe",
                   "in the left lower lobe", "in the middle lobe", "in the lingula")),
    _Region("mediastinum", ("mediastinum",), ("mediastinal",), "CHEST", 0.8),
    _Region("rib", ("ribs",), ("rib",), "CHEST", 0.3),
    _Region("abdomen", ("abdomen", "upper abdomen"), ("abdominal",), "ABDOMEN", 6.0),
    _Region("liver", ("liver",), ("liver", "hepatic"), "ABDOMEN", 3.5,
            sites=("in segment VII of the liver", "in the right lobe of the liver",
                   "in the left lobe of the liver", "in the liver", "in segment IV")),
    _Region("kidney", ("kidney", "kidneys"), ("renal", "kidney"), "ABDOMEN", 2.5, paired=True,
            sites=("at the lower pole of the kidney", "at the upper pole of the kidney", "in the kidney")),
    _Region("pancreas", ("pancreas",), ("pancreatic",), "ABDOMEN", 1.6,
            sites=("in the uncinate process", "in the pancreatic tail", "in the body of the pancreas")),
    _Region("spleen", ("spleen",), ("splenic",), "ABDOMEN", 0.8),
    _Region("gallbladder", ("gallbladder",), ("gallbladder",), "ABDOMEN", 0.8),
    _Region("stomach", ("stomach",), ("gastric",), "ABDOMEN", 0.6),
    _Region("colon", ("colon", "sigmoid colon", "ascending colon"), ("colonic",), "ABDOMEN", 0.7),
    _Region("smallbowel", ("small bowel", "small intestine"), ("small bowel",), "ABDOMEN", 0.5),
    _Region("esophagus", ("esophagus", "distal esophagus"), ("esophageal",), "ABDOMEN", 0.35),
    _Region("pelvis", ("pelvis",), ("pelvic",), "PELVIS", 3.0),
    _Region("bladder", ("urinary bladder", "bladder"), ("bladder",), "PELVIS", 0.9),
    _Region("prostate", ("prostate",), ("prostate",), "PELVIS", 0.7),
    _Region("uterus", ("uterus",), ("uterine",), "PELVIS", 0.7),
    _Region("brain", ("brain",), ("brain", "cerebral"), "HEAD", 4.5,
            sites=("in the left frontal lobe", "in the right parietal lobe", "in the left temporal lobe",
                   "in the right basal ganglia", "in the occipital lobe", "in the cerebellum",
                   "in the left cerebellar hemisphere", "in the periventricular white matter")),
    _Region("head", ("head",), ("head",), "HEAD", 2.0),
    _Region("skull", ("skull",), ("skull",), "HEAD", 0.4),
    _Region("neck", ("neck",), ("neck",), "NECK", 2.5,
            sites=("at level II of the neck", "in the submandibular region", "in the left neck", "in the right neck")),
    _Region("thyroid", ("thyroid gland", "thyroid"), ("thyroid",), "NECK", 1.2,
            sites=("in the right thyroid lobe", "in the left thyroid lobe", "in the isthmus")),
    _Region("mandible", ("mandible",), ("mandibular",), "NECK", 0.7),
    _Region("lumbar", ("lumbar spine",), ("lumbar spine",), "SPINE", 2.5,
            sites=("at L4-L5", "at L5-S1", "at L3-L4", "at the L2 level", "of the L1 vertebral body")),
    _Region("cervical", ("cervical spine",), ("cervical spine",), "SPINE", 1.5,
            sites=("at C5-C6", "at C6-C7", "at C4-C5", "at the C2 level")),
    _Region("thoracicspine", ("thoracic spine",), ("thoracic spine",), "SPINE", 0.7,
            sites=("at T12", "at the T8 level", "of the T11 vertebral body")),
    _Region("spine", ("spine", "whole spine", "vertebral column"), ("spine",), "SPINE", 0.9),
    _Region("knee", ("knee",), ("knee",), "MSK", 2.5, paired=True),
    _Region("hip", ("hip",), ("hip",), "MSK", 1.6, paired=True),
    _Region("shoulder", ("shoulder",), ("shoulder",), "MSK", 1.2, paired=True),
    _Region("ankle", ("ankle", "ankle joint"), ("ankle",), "MSK", 0.9, paired=True),
    _Region("femur", ("femur", "proximal femur", "distal femur"), ("femoral",), "MSK", 0.9, paired=True),
    _Region("tibia", ("tibia", "proximal tibia"), ("tibial",), "MSK", 0.6, paired=True),
    _Region("humerus", ("humerus", "proximal humerus"), ("humeral",), "MSK", 0.45, paired=True),
    _Region("aorta", ("aorta", "abdominal aorta", "thoracic aorta", "aortic arch"), ("aortic",), "VASCULAR", 2.0),
    _Region("carotid", ("carotid artery", "internal carotid artery", "carotid arteries"), ("carotid",),
            "VASCULAR", 1.0, paired=True),
    _Region("breast", ("breast",), ("breast",), "BREAST", 1.0, paired=True,
            sites=("in the upper outer quadrant", "in the lower inner quadrant", "in the retroareolar region")),
    _Region("heart", ("heart",), ("cardiac",), "HEART", 1.0),
)
_REGION_BY_KEY = {r.key: r for r in _REGIONS}

_ALL_BODY = ("CHEST", "ABDOMEN", "PELVIS", "HEAD", "NECK", "SPINE", "MSK", "BREAST")

_FINDINGS: tuple[_Finding, ...] = (
    _Finding("lesion", ("lesion",), ("lesions",), _ALL_BODY, 6.0, sized=True),
    _Finding("mass", ("mass", "soft-tissue mass"), ("masses",), (*_ALL_BODY, "HEART"), 5.0, sized=True),
    _Finding("tumor", ("tumor", "tumour", "neoplasm"), ("tumors",), _ALL_BODY, 2.5, sized=True),
    _Finding("fracture", ("fracture", "displaced fracture", "comminuted fracture@MSK", "compression fracture@SPINE"),
             ("fractures",), ("MSK", "SPINE", "rib", "skull", "mandible", "pelvis"), 4.0),
    _Finding("nodule", ("nodule", "pulmonary nodule@chest,lung", "thyroid nodule@thyroid"), ("nodules",),
             ("chest", "lung", "thyroid", "liver", "breast"), 3.0, sized=True),
    _Finding("cyst", ("cyst", "simple cyst", "renal cyst@kidney", "hepatic cyst@liver"), ("cysts",),
             ("kidney", "liver", "pancreas", "pelvis", "uterus", "breast", "neck", "thyroid", "brain", "MSK",
              "mandible"), 2.6, sized=True),
    _Finding("metastasis", ("metastasis", "metastatic lesion", "metastatic deposit"), ("metastases",),
             ("chest", "lung", "liver", "brain", "SPINE", "abdomen", "pelvis", "femur", "humerus"), 2.0, sized=True),
    _Finding("calcification", ("calcification", "coarse calcification", "vascular calcification@VASCULAR"),
             ("calcifications",),
             ("breast", "brain", "pancreas", "VASCULAR", "chest", "kidney", "thyroid", "shoulder"), 1.5),
    _Finding("pleuraleffusion", ("pleural effusion",), ("pleural effusions",), ("chest", "lung"), 2.6, sided=True),
    _Finding("pneumothorax", ("pneumothorax", "tension pneumothorax"), (), ("chest", "lung"), 2.0, sided=True),
    _Finding("hemorrhage", ("hemorrhage", "haemorrhage", "intraventricular hemorrhage@HEAD",
                            "subarachnoid hemorrhage@HEAD", "active bleeding@ABDOMEN,PELVIS"), (),
             ("HEAD", "abdomen", "pelvis", "kidney", "spleen", "liver"), 2.2),
    _Finding("hematoma", ("hematoma", "subdural hematoma@HEAD", "haematoma", "epidural hematoma@SPINE"), (),
             ("brain", "head", "abdomen", "MSK", "SPINE", "pelvis", "kidney", "spleen", "liver"), 1.4, sized=True),
    _Finding("edema", ("edema", "bone marrow edema@MSK,SPINE", "vasogenic edema@brain", "oedema",
                       "interstitial edema@chest,lung"), (), ("brain", "MSK", "SPINE", "lung", "chest"), 1.4),
    _Finding("infarction", ("infarction", "infarct", "acute infarct"), ("infarcts",), ("brain", "kidney", "spleen"),
             1.8),
    _Finding("abscess", ("abscess", "rim-enhancing abscess"), ("abscesses",),
             ("liver", "abdomen", "pelvis", "neck", "brain", "lung", "SPINE", "MSK", "kidney"), 1.2, sized=True),
    _Finding("lymphadenopathy", ("lymphadenopathy", "mediastinal lymphadenopathy@CHEST",
                                 "cervical lymphadenopathy@NECK", "axillary lymphadenopathy@BREAST",
                                 "retroperitoneal lymphadenopathy@abdomen"), (),
             ("chest", "mediastinum", "neck", "abdomen", "pelvis", "breast"), 1.3),
    _Finding("stenosis", ("stenosis", "spinal canal stenosis@SPINE", "high-grade stenosis@VASCULAR",
                          "foraminal stenosis@SPINE"), (), ("VASCULAR", "lumbar", "cervical", "spine"), 1.6),
    _Finding("aneurysm", ("aneurysm", "saccular aneurysm", "fusiform aneurysm"), ("aneurysms",),
             ("VASCULAR", "brain"), 1.6, sized=True),
    _Finding("pneumonia", ("pneumonia", "lobar pneumonia"), (), ("chest", "lung"), 1.1, sided=True),
    _Finding("thrombosis", ("thrombosis", "venous thrombosis", "portal vein thrombosis@liver",
                            "venous sinus thrombosis@brain"), (), ("VASCULAR", "brain", "liver"), 0.8),
    _Finding("pe", ("pulmonary embolism", "pulmonary emboli", "bilateral pulmonary emboli"), (), ("chest",), 0.8),
    _Finding("carcinoma", ("carcinoma", "hepatocellular carcinoma@liver", "renal cell carcinoma@kidney",
                           "squamous cell carcinoma@lung,neck,esophagus"), (),
             ("liver", "kidney", "lung", "breast", "pancreas", "stomach", "colon", "thyroid", "esophagus",
              "prostate", "bladder"), 1.0),
    _Finding("pericardialeffusion", ("pericardial effusion",), (), ("HEART", "chest"), 0.7),
    _Finding("ascites", ("ascites",), (), ("abdomen", "liver", "pelvis"), 0.7),
    _Finding("atelectasis", ("atelectasis", "basal atelectasis"), (), ("chest", "lung"), 0.6, sided=True),
    _Finding("lymphoma", ("lymphoma",), (), ("neck", "mediastinum", "abdomen", "brain", "spleen"), 0.5),
    _Finding("hydronephrosis", ("hydronephrosis",), (), ("kidney",), 1.0, sided=True),
    _Finding("cardiomegaly", ("cardiomegaly",), (), ("chest", "HEART"), 0.45),
    _Finding("fibrosis", ("fibrosis", "pulmonary fibrosis"), (), ("lung", "chest"), 0.35),
    _Finding("meningioma", ("meningioma",), (), ("brain", "head"), 0.35, sized=True),
    _Finding("hydrocephalus", ("hydrocephalus",), (), ("brain", "head"), 0.35),
    _Finding("cholelithiasis", ("cholelithiasis", "gallstones"), (), ("gallbladder",), 1.0),
    _Finding("cirrhosis", ("cirrhosis",), (), ("liver",), 0.6),
    _Finding("pancreatitis", ("pancreatitis", "acute pancreatitis"), (), ("pancreas",), 0.35),
    _Finding("obstruction", ("bowel obstruction", "intestinal obstruction"), (), ("abdomen", "smallbowel", "colon"),
             0.3),
    _Finding("hernia", ("hernia", "hiatal hernia@esophagus,stomach", "inguinal hernia@pelvis"), (),
             ("abdomen", "smallbowel", "esophagus", "stomach", "pelvis"), 0.25),
    _Finding("splenomegaly", ("splenomegaly",), (), ("spleen", "abdomen"), 0.2),
    _Finding("appendicitis", ("appendicitis", "acute appendicitis"), (), ("abdomen", "pelvis"), 0.3),
    _Finding("diverticulitis", ("diverticulitis", "sigmoid diverticulitis"), (), ("colon", "abdomen"), 0.12),
    _Finding("tuberculosis", ("tuberculosis", "pulmonary tuberculosis"), (), ("lung", "chest"), 0.3),
    _Finding("bronchiectasis", ("bronchiectasis",), (), ("lung", "chest"), 0.25),
    _Finding("osteomyelitis", ("osteomyelitis",), (), ("MSK", "SPINE"), 0.3),
    # Findings without a concept in the table: present in the text, never labelled.
    _Finding("consolidation", ("consolidation", "airspace opacity"), (), ("chest", "lung"), 1.2, sided=True),
    _Finding("ggo", ("ground-glass opacity",), ("ground-glass opacities",), ("lung", "chest"), 0.8),
    _Finding("herniation", ("disc herniation", "disc protrusion"), (), ("lumbar", "cervical"), 1.5),
    _Finding("jointeffusion", ("joint effusion",), (), ("knee", "hip", "shoulder", "ankle"), 0.8),
    _Finding("tear", ("meniscal tear",), (), ("knee",), 0.6),
    _Finding("dissection", ("dissection", "intimal flap"), (), ("VASCULAR",), 0.8),
    _Finding("occlusion", ("occlusion",), (), ("carotid", "brain"), 0.5),
    _Finding("dilatation", ("dilatation", "wall thickening"), (),
             ("smallbowel", "colon", "stomach", "esophagus", "gallbladder"), 0.8),
    _Finding("freefluid", ("free fluid",), (), ("abdomen", "pelvis"), 0.5),
    _Finding("vegetation", ("vegetation",), (), ("HEART",), 0.3),
)

_VASCULAR_FINDINGS = ("aneurysm", "stenosis", "thrombosis", "hemorrhage", "dissection", "occlusion", "calcification",
                      "pe", "mass", "tumor")
_MODALITIES: tuple[_Modality, ...] = (
    _Modality("ct", (("CT", 5.0), ("computed tomography", 2.0), ("CT scan", 2.0), ("CT image", 1.0),
                     ("computed tomography scan", 0.6), ("multidetector CT", 0.3)),
              (("CHEST", 3.0), ("ABDOMEN", 3.5), ("PELVIS", 1.0), ("HEAD", 1.8), ("NECK", 0.8),
               ("SPINE", 0.6), ("MSK", 0.4), ("VASCULAR", 0.7)), 6.0,
              views=(("axial", 4.0), ("coronal", 2.0), ("sagittal", 0.8), ("", 4.0))),
    _Modality("xray", (("radiograph", 5.0), ("X-ray", 3.0), ("plain radiograph", 1.0), ("plain film", 0.8),
                       ("X-ray image", 0.6)),
              (("CHEST", 5.0), ("MSK", 3.0), ("SPINE", 0.8), ("ABDOMEN", 0.4), ("PELVIS", 0.6), ("HEAD", 0.1),
               ("NECK", 0.1)), 4.5,
              views=(("anteroposterior", 1.5), ("AP", 0.8), ("lateral", 1.5), ("PA", 1.0), ("oblique", 0.3),
                     ("", 5.0)),
              regions=("chest", "lung", "rib", "abdomen", "pelvis", "skull", "lumbar", "cervical", "thoracicspine",
                       "spine", "knee", "hip", "shoulder", "ankle", "femur", "tibia", "humerus", "mandible"),
              findings=("fracture", "nodule", "mass", "lesion", "tumor", "metastasis", "calcification",
                        "pleuraleffusion", "pneumothorax", "pneumonia", "atelectasis", "cardiomegaly", "fibrosis",
                        "tuberculosis", "bronchiectasis", "edema", "consolidation", "obstruction", "dilatation",
                        "jointeffusion", "osteomyelitis", "cyst", "stenosis", "herniation", "lymphadenopathy")),
    _Modality("mri", (("MRI", 5.0), ("MR image", 1.5), ("MR imaging", 1.0), ("magnetic resonance imaging", 1.2),
                      ("MRI scan", 0.5), ("magnetic resonance image", 0.4)),
              (("HEAD", 3.0), ("SPINE", 2.5), ("MSK", 1.8), ("PELVIS", 1.0), ("ABDOMEN", 0.8), ("NECK", 0.4),
               ("BREAST", 0.3), ("HEART", 0.15)), 3.5,
              views=(("axial", 3.0), ("sagittal", 3.0), ("coronal", 2.0), ("", 2.5))),
    _Modality("us", (("ultrasound", 4.0), ("ultrasonography", 2.0), ("sonography", 1.0), ("ultrasound image", 1.0),
                     ("Doppler ultrasound", 0.6), ("sonogram", 0.4)),
              (("ABDOMEN", 3.0), ("NECK", 1.2), ("PELVIS", 1.2), ("BREAST", 0.8), ("VASCULAR", 0.4),
               ("MSK", 0.3)), 2.0,
              views=(("transverse", 1.0), ("longitudinal", 1.0), ("", 5.0)),
              regions=("liver", "kidney", "gallbladder", "spleen", "pancreas", "abdomen", "neck", "thyroid",
                       "pelvis", "bladder", "uterus", "prostate", "breast", "carotid", "aorta", "shoulder", "knee"),
              findings=("lesion", "mass", "tumor", "nodule", "cyst", "metastasis", "calcification", "hemorrhage",
                        "hematoma", "abscess", "lymphadenopathy", "stenosis", "aneurysm", "thrombosis", "carcinoma",
                        "ascites", "hydronephrosis", "cholelithiasis", "cirrhosis", "pancreatitis", "appendicitis",
                        "splenomegaly", "hernia", "lymphoma", "jointeffusion", "tear", "freefluid", "dissection",
                        "occlusion", "dilatation")),
    _Modality("angio", (("angiography", 3.0), ("angiogram", 2.0), ("digital subtraction angiography", 1.0),
                        ("selective angiography", 0.5)),
              (("VASCULAR", 3.0), ("HEAD", 1.0), ("ABDOMEN", 0.4)), 1.0,
              views=(("anteroposterior", 0.8), ("lateral", 0.8), ("", 4.0)),
              regions=("aorta", "carotid", "brain", "kidney", "liver"), findings=_VASCULAR_FINDINGS),
    _Modality("cta", (("CT angiography", 3.0), ("CT angiogram", 1.0)),
              (("VASCULAR", 2.0), ("HEAD", 0.8), ("CHEST", 0.8)), 0.7,
              views=(("axial", 1.0), ("coronal", 1.0), ("sagittal", 0.5), ("", 2.0)),
              regions=("aorta", "carotid", "brain", "chest"), findings=_VASCULAR_FINDINGS),
    _Modality("pet", (("PET/CT", 3.0), ("FDG PET/CT", 2.0), ("PET-CT", 1.0), ("18F-FDG PET", 0.6),
                      ("positron emission tomography", 0.3)),
              (("CHEST", 2.0), ("ABDOMEN", 1.0), ("NECK", 0.5), ("SPINE", 0.3)), 0.6,
              views=(("axial", 1.0), ("coronal", 1.0), ("", 2.0)),
              regions=("chest", "lung", "mediastinum", "abdomen", "liver", "pancreas", "neck", "thyroid", "spine"),
              findings=("mass", "lesion", "nodule", "metastasis", "lymphadenopathy", "lymphoma", "carcinoma",
                        "tumor")),
    _Modality("echo", (("echocardiography", 2.0), ("transthoracic echocardiography", 1.0), ("echocardiogram", 1.0),
                       ("transesophageal echocardiography", 0.5)),
              (("HEART", 1.0),), 0.45),
    _Modality("mammo", (("mammography", 2.0), ("mammogram", 2.0), ("mammographic image", 0.5)),
              (("BREAST", 1.0),), 0.25,
              views=(("craniocaudal", 1.0), ("mediolateral oblique", 1.0), ("", 2.0)),
              findings=("mass", "calcification", "lesion", "nodule", "cyst", "carcinoma", "lymphadenopathy")),
    _Modality("fluoro", (("fluoroscopy", 2.0), ("fluoroscopic image", 1.5), ("barium swallow fluoroscopy@esophagus",
                                                                           0.5)),
              (("ABDOMEN", 2.0), ("SPINE", 0.5)), 0.25,
              views=(("anteroposterior", 0.5), ("lateral", 0.5), ("", 3.0)),
              regions=("esophagus", "stomach", "smallbowel", "colon", "lumbar", "cervical"),
              findings=("hernia", "dilatation", "stenosis", "obstruction", "mass", "lesion", "fracture", "carcinoma",
                        "tumor", "herniation")),
    _Modality("nm", (("bone scintigraphy@SPINE,MSK", 2.0), ("scintigraphy", 1.0),
                     ("whole-body bone scan@SPINE,MSK", 1.0), ("radionuclide scan", 0.5)),
              (("SPINE", 1.0), ("MSK", 0.6), ("NECK", 0.6)), 0.2,
              regions=("spine", "lumbar", "thoracicspine", "femur", "hip", "thyroid"),
              findings=("metastasis", "fracture", "lesion", "osteomyelitis", "nodule", "tumor")),
)

_DESCRIPTORS = {
    "ct": ("hypodense", "hyperdense", "hypoattenuating", "enhancing", "heterogeneous", "well-defined",
           "ill-defined", "lobulated"),
    "cta": ("large", "small", "irregular"),
    "xray": ("large", "small", "subtle", "well-defined", "ill-defined"),
    "mri": ("hyperintense", "hypointense", "T2-hyperintense", "enhancing", "heterogeneous", "well-circumscribed"),
    "us": ("hypoechoic", "hyperechoic", "anechoic", "heterogeneous", "well-defined"),
    "angio": ("large", "small", "irregular"),
    "pet": ("FDG-avid", "hypermetabolic", "intensely avid"),
    "echo": ("large", "small", "mobile"),
    "mammo": ("spiculated", "irregular", "circumscribed", "dense"),
    "fluoro": ("irregular", "smooth", "long-segment"),
    "nm": ("focal", "intense", "multifocal"),
}
_SEQUENCES = ("T2-weighted", "T1-weighted", "contrast-enhanced T1-weighted", "fat-suppressed T2-weighted",
              "FLAIR", "diffusion-weighted", "STIR", "gadolinium-enhanced T1-weighted")
_TRAILERS = ("with peripheral enhancement", "with surrounding edema@HEAD", "causing mass effect@HEAD",
             "with internal septations@kidney,liver,pelvis,uterus", "abutting the adjacent vessels",
             "without mass effect@HEAD", "compressing the thecal sac@SPINE", "with perilesional edema@HEAD",
             "with posterior acoustic shadowing@BREAST", "extending into the soft tissues",
             "with central necrosis", "unchanged from the prior study")
# Grading words for findings that take them: fluid collections by amount, the rest by severity.
_AMOUNT = ("small", "large", "moderate", "massive", "minimal")
_GRADE = ("mild", "moderate", "severe", "marked")
_GRADED = {"pleuraleffusion": _AMOUNT, "pneumothorax": _AMOUNT, "ascites": _AMOUNT, "freefluid": _AMOUNT,
           "pericardialeffusion": _AMOUNT, "jointeffusion": _AMOUNT, "hemorrhage": _GRADE, "edema": _GRADE,
           "hydronephrosis": _GRADE, "atelectasis": _GRADE, "lymphadenopathy": _GRADE, "cardiomegaly": _GRADE,
           "consolidation": _GRADE, "stenosis": _GRADE, "hydrocephalus": _GRADE, "dilatation": _GRADE}
_SHOW_VERBS = (("showing", 5.0), ("demonstrating", 3.0), ("revealing", 2.0), ("shows", 2.0),
               ("demonstrates", 1.5), ("reveals", 1.0), ("with", 2.0), ("depicting", 0.5), ("confirming", 0.4))
_MARKERS = (("", 10.0), (" (arrow)", 4.0), (" (arrows)", 2.0), (" (white arrow)", 0.8), (" (arrowhead)", 0.8),
            (" (asterisk)", 0.5), (" (red arrow)", 0.4), (" (circle)", 0.3))
_CONTEXT_PREFIXES = ("Preoperative", "Postoperative", "Follow-up", "Initial", "Emergency", "Pretreatment",
                     "Post-treatment", "Baseline")
_ADULTS = ("man", "woman", "male", "female", "patient")
_CHILDREN = ("boy", "girl", "child")
_COMPLAINTS = ("fever", "acute onset of pain", "weight loss", "dyspnea", "trauma", "a fall", "headache",
               "cough", "jaundice", "swelling", "seizures", "back pain", "a palpable lump", "hematuria",
               "no prior medical history", "a history of smoking", "progressive weakness")
_HISTORIES = ("known cirrhosis", "a history of tuberculosis", "suspected appendicitis", "suspected osteomyelitis",
              "recurrent pancreatitis", "suspected pulmonary embolism", "known lymphoma", "a history of carcinoma",
              "chronic bronchiectasis", "shunted hydrocephalus", "suspected diverticulitis",
              "symptomatic cholelithiasis", "splenomegaly", "an incarcerated hernia", "suspected bowel obstruction",
              "a resected meningioma", "metastatic disease", "hydronephrosis on a previous scan")
_FOLLOW_UPS = ("Follow-up imaging after {n} months showed complete resolution.",
               "The lesion had increased in size compared with the study {n} months earlier.",
               "Findings were confirmed at surgery.", "Histopathology confirmed the diagnosis.",
               "The patient improved after {n} days of treatment.", "Compare with the prior study.",
               "Image obtained on postoperative day {n}.", "Same patient as in Figure {n}.")


def _fits(option: str, region: _Region) -> bool:
    """'text@key1,GROUP2' restricts 'text' to those region keys or groups; plain 'text' fits anywhere."""
    where = option.partition("@")[2]
    return not where or region.key in where.split(",") or region.group in where.split(",")


def _variants(options: Sequence[str], region: _Region) -> list[str]:
    """The texts of the options that fit ``region`` (all untagged ones if none does)."""
    fitting = [o.partition("@")[0] for o in options if _fits(o, region)]
    return fitting or [o for o in options if "@" not in o]


def _pick(rng: random.Random, items: Sequence[tuple[str, float]]) -> str:
    return rng.choices([x for x, _ in items], weights=[w for _, w in items], k=1)[0]


def _article(phrase: str) -> str:
    first = phrase.split()[0].lower() if phrase else ""
    number = re.match(r"\d+", first)
    if number:
        value = int(number.group())
        return "an" if value in (8, 11, 18) or 80 <= value <= 89 else "a"
    return "an" if first[:1] in "aeiou" or first.startswith("fdg") else "a"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"{rng.randint(1, 12)}.{rng.randint(0, 9)} cm"
    return f"{rng.randint(3, 45)}-mm"


def _compatible(mod: _Modality, region: _Region) -> bool:
    in_group = any(group == region.group for group, _ in mod.groups)
    return in_group and (not mod.regions or region.key in mod.regions)


class _Builder:
    """Builds one caption; holds the RNG and the sampling tables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.region_side = "right"  # side of a paired organ, fixed per caption

    # -- sampling -------------------------------------------------------------------------------
    def modality(self) -> _Modality:
        return self.rng.choices(_MODALITIES, weights=[m.weight for m in _MODALITIES], k=1)[0]

    def region(self, mod: _Modality) -> _Region:
        group = _pick(self.rng, mod.groups)
        cands = [r for r in _REGIONS if r.group == group and (not mod.regions or r.key in mod.regions)]
        if not cands:
            cands = [_REGION_BY_KEY[k] for k in mod.regions]
        return self.rng.choices(cands, weights=[r.weight for r in cands], k=1)[0]

    def finding(self, mod: _Modality, region: _Region, exclude: Sequence[str] = ()) -> _Finding | None:
        cands = [f for f in _FINDINGS if (region.key in f.where or region.group in f.where)
                 and f.key not in exclude and (not mod.findings or f.key in mod.findings)]
        if not cands:
            return None
        # findings specific to this organ ("cholelithiasis" for the gallbladder) get a boost
        weights = [f.weight * (4.0 if region.key in f.where else 1.0) for f in cands]
        return self.rng.choices(cands, weights=weights, k=1)[0]

    def side(self) -> str:
        return "bilateral" if self.rng.random() < 0.12 else self.region_side

    # -- phrases --------------------------------------------------------------------------------
    def region_np(self, region: _Region) -> str:
        noun = self.rng.choice(region.nouns)
        if region.paired and self.rng.random() < 0.6:
            if noun.endswith("s") and not noun.endswith("us"):
                return f"both {noun}" if self.rng.random() < 0.5 else f"the {noun} bilaterally"
            return f"the {self.region_side} {noun}"
        return f"the {noun}"

    def finding_np(self, f: _Finding, mod: _Modality, region: _Region) -> tuple[str, bool]:
        """('a 2.3 cm hypodense lesion', False), ('multiple nodules', True), ('large right pleural effusion', False)."""
        rng = self.rng
        noun = rng.choice(_variants(f.singular, region))
        words: list[str] = []
        plural = False
        if f.plural and rng.random() < 0.2:
            noun = rng.choice(f.plural)
            plural = True
            words.append(rng.choice(("multiple", "several", "two", "numerous", "bilateral")))
        if f.sided and not plural and rng.random() < 0.6:
            side = self.side()
            if side == "bilateral":
                words.append("bilateral")
                if f.plural:
                    noun = f.plural[0]
                    plural = True
            else:
                words.append(rng.choice((side, f"{side}-sided")))
        sized = f.sized and not plural and rng.random() < 0.3
        if sized:
            words.insert(0, _size(rng))
        if f.key in _GRADED and " " not in noun and rng.random() < 0.45:
            words.insert(0, rng.choice(_GRADED[f.key]))
        elif f.sized and rng.random() < 0.45 and mod.key in _DESCRIPTORS:
            options = [d for d in _DESCRIPTORS[mod.key] if not (sized and d in ("small", "large"))]
            words.append(rng.choice(options))
        phrase = " ".join([*words, noun])
        if f.plural and not plural:
            phrase = f"{_article(phrase)} {phrase}"
        if f.sized and not sized and not plural and rng.random() < 0.12:
            phrase += f" measuring {rng.randint(1, 9)}.{rng.randint(0, 9)} x {rng.randint(1, 6)}.{rng.randint(0, 9)} cm"
        elif f.sized and rng.random() < 0.15:
            phrase += " " + rng.choice(_variants(_TRAILERS, region))
        return phrase, plural

    def location(self, f: _Finding, region: _Region) -> str:
        rng = self.rng
        if f.sided:
            return ""
        other_side = "left" if self.region_side == "right" else "right"
        sites = [site for site in region.sites if other_side not in site.split()]
        if sites and rng.random() < 0.55:
            return " " + rng.choice(sites)
        if rng.random() < 0.3 and region.group not in ("CHEST", "HEART"):
            return f" in {self.region_np(region)}"
        return ""

    def study(self, mod: _Modality, region: _Region, with_region: bool = True) -> str:
        """'Axial contrast-enhanced CT of the abdomen', 'Chest radiograph, PA view', ..."""
        rng = self.rng
        noun = _pick(rng, [(text, w) for text, w in mod.nouns if _fits(text, region)]).partition("@")[0]
        view = _pick(rng, mod.views) if mod.views else ""
        pre: list[str] = []
        sequence = rng.choice(_SEQUENCES) if mod.key == "mri" and rng.random() < 0.5 else ""
        if mod.key in ("ct", "mri") and "enhanced" not in sequence and rng.random() < 0.3:
            pre.append(rng.choice(("contrast-enhanced", "unenhanced", "post-contrast")))
        if sequence:
            pre.append(sequence)
        if rng.random() < 0.12:
            pre.insert(0, rng.choice(_CONTEXT_PREFIXES).lower())
        style = rng.random()
        if mod.key == "echo":
            with_region = with_region and style < 0.15
        if not with_region:
            core = " ".join([*pre, noun])
        elif mod.key == "xray" and view in ("PA", "AP", "lateral", "oblique") and style < 0.45:
            adj = rng.choice(region.adjs or region.nouns)
            core = " ".join([*pre, adj, noun]) + f", {view} view"
            view = ""
        elif style < 0.35 and region.adjs:
            core = " ".join([*pre, rng.choice(region.adjs), noun])
        else:
            core = " ".join([*pre, noun]) + f" of {self.region_np(region)}"
            if mod.key == "ct" and "unenhanced" not in pre and rng.random() < 0.15:
                core += " " + rng.choice(("with intravenous contrast", "in the arterial phase",
                                          "in the portal venous phase", "with oral contrast"))
        if view:
            suffix = rng.random()
            if mod.key in ("ct", "cta", "pet") and view in ("coronal", "sagittal") and suffix < 0.3:
                return f"{view} reformatted {core}"
            if suffix < 0.15 and view not in ("AP", "PA"):
                return f"{core}, {view} view"
            return f"{view} {core}"
        return core

    def clause(self, mod: _Modality, region: _Region, exclude: Sequence[str] = ()) -> tuple[str, str, bool]:
        """(finding key, 'a hypodense lesion in the liver', plural?); key '' when nothing fits."""
        f = self.finding(mod, region, exclude)
        if f is None:
            return "", "", False
        np, plural = self.finding_np(f, mod, region)
        return f.key, np + self.location(f, region), plural

    # -- whole captions -------------------------------------------------------------------------
    def sentence(self, mod: _Modality, region: _Region) -> tuple[str, list[str]]:
        """One sentence about one study; returns it and the finding keys it mentions (none: normal)."""
        rng = self.rng
        key, clause, plural = self.clause(mod, region)
        used = [key] if key else []
        if rng.random() < 0.2 and key:
            key2, clause2, _ = self.clause(mod, region, exclude=used)
            if key2:
                used.append(key2)
                clause = f"{clause} and {clause2}"
                plural = True
        marker = _pick(rng, _MARKERS)
        form = rng.random()
        if not key or form < 0.08:
            tail = rng.choice(("", "", " with normal findings", " without abnormality", " obtained at admission"))
            return _cap(self.study(mod, region)) + tail + ".", []
        if form < 0.55:
            return f"{_cap(self.study(mod, region))} {_pick(rng, _SHOW_VERBS)} {clause}{marker}.", used
        if form < 0.72:
            return f"{_cap(self.study(mod, region))}: {clause}{marker}.", used
        if form < 0.87:
            study = self.study(mod, region)
            prep = "on" if rng.random() < 0.7 else "seen on"
            return f"{_cap(clause)}{marker} {prep} {study}.", used
        verbs = ("are seen", "are noted", "are present", "are visible", "were detected")
        if not plural:
            verbs = ("is seen", "is noted", "is present", "is visible", "was detected")
        study = self.study(mod, region, with_region=rng.random() < 0.5)
        return f"{_cap(study)}: {clause} {rng.choice(verbs)}{marker}.", used

    def extra(self, mod: _Modality, region: _Region, used: list[str]) -> str:
        """A follow-on sentence: another finding, a negated one, or a follow-up note."""
        rng = self.rng
        r = rng.random()
        if r < 0.45 and used:  # no "additional findings" after a normal study
            key, clause, _ = self.clause(mod, region, exclude=used)
            if key:
                used.append(key)
                return rng.choice(("Associated finding: {}.", "Note also {}.", "Additional finding: {}.",
                                   "Also note {}.")).format(clause)
        if r < 0.7:
            f = self.finding(mod, region, exclude=used)
            if f is not None:
                noun = rng.choice(_variants(f.singular, region))
                return f"No {noun} was seen." if rng.random() < 0.5 else f"No evidence of {noun}."
        return rng.choice(_FOLLOW_UPS).format(n=rng.randint(2, 14))

    def caption(self) -> str:
        rng = self.rng
        mod = self.modality()
        region = self.region(mod)
        self.region_side = rng.choice(("right", "left"))
        parts: list[str] = []
        if rng.random() < 0.15:
            history = rng.choice(_HISTORIES if rng.random() < 0.4 else _COMPLAINTS)
            years = rng.randint(2, 88)
            person = rng.choice(_CHILDREN if years < 16 else _ADULTS)
            parts.append(f"{_cap(_article(str(years)))} {years}-year-old {person} with {history}.")
        elif rng.random() < 0.04:
            parts.append(f"Case {rng.randint(1, 9)}:")
        if rng.random() < 0.2:
            # multi-panel figure: 2-3 panels of the same region, different views or modalities
            n_panels = rng.choice((2, 2, 3))
            for label in "ABC"[:n_panels]:
                other = self.modality()
                m = other if rng.random() < 0.4 and _compatible(other, region) else mod
                parts.append(f"({label}) {self.sentence(m, region)[0]}")
        else:
            text, used = self.sentence(mod, region)
            if rng.random() < 0.08:
                text = f"({rng.choice('AB')}) {text}"
            parts.append(text)
            n_extra = 0
            while rng.random() < (0.45 if n_extra == 0 else 0.3) and n_extra < 3:
                parts.append(self.extra(mod, region, used))
                n_extra += 1
        return " ".join(p for p in parts if p)


def generate_captions(n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic caption records, a pure function of ``(n, seed)``.

    Records look like the real data: ``{"image_id": "SYNTH_000000", "caption": ..., "cui": [...],
    "license": "CC0 (synthetic)"}``, where ``cui`` is the sorted unique list of real UMLS CUIs the
    caption mentions (:func:`extract_cuis`). Captions are unique within one call, and the output for
    ``n`` is a prefix of the output for any larger ``n`` with the same seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    builder = _Builder(rng)
    seen: set[str] = set()
    records: list[dict] = []
    for i in range(n):
        for _ in range(100):
            text = builder.caption()
            if text not in seen and len(text.split()) <= 90:
                break
        seen.add(text)
        records.append({"image_id": f"SYNTH_{i:06d}", "caption": text, "cui": extract_cuis(text),
                        "license": LICENSE})
    return records


# In write order: cui_names.json is written last, so its presence marks a finished write (every
# file is swapped in whole, and versions before the atomic writes also wrote it last).
DATASET_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "cui_names.json")


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def dataset_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a dataset :func:`write_dataset` finished writing. A directory
    from a write that was interrupted is not complete: write it again (the output is
    deterministic, so nothing is lost). Use this, not 'train.jsonl exists', before reusing one."""
    out = Path(out_dir)
    return all((out / name).is_file() for name in DATASET_FILES)


def write_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 3000,
    n_validation: int = 500,
    n_test: int = 500,
    seed: int = 0,
) -> Path:
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``cui_names.json`` to ``out_dir``.

    The three splits are consecutive slices of one :func:`generate_captions` run, so their image
    ids are disjoint and no caption appears in two splits. ``cui_names.json`` maps every CUI used
    in the splits to its name. The files are byte-identical for the same arguments.

    Each file is replaced whole (temporary file + os.replace) and ``cui_names.json`` is written
    last, so :func:`dataset_complete` never mistakes a cut-short write for a finished one.
    """
    for name, value in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = generate_captions(n_train + n_validation + n_test, seed=seed)
    splits = {
        "train": records[:n_train],
        "validation": records[n_train:n_train + n_validation],
        "test": records[n_train + n_validation:],
    }
    for split, recs in splits.items():
        _write_jsonl(out / f"{split}.jsonl", recs)
    used = sorted({cui for rec in records for cui in rec["cui"]})
    names = {cui: CUI_NAMES[cui] for cui in used}
    write_text(out / "cui_names.json", json.dumps(names, indent=2, ensure_ascii=False) + "\n")
    return out
