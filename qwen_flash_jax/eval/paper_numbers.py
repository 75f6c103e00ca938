"""The numbers of the paper's Tables 1-4 that the findings quote (tests/test_findings.py checks them against the
paper's text)."""

# The paper's numbers, quoted from /work/shared/paper/qwen-image-flash.md (arXiv 2606.03746): per row the
# (Gemini 3.1 Pro, GPT 5.5) scores, in the tables' column order; tests/test_findings.py checks each against the text.

PAPER_T2I_CATEGORIES = ("landscape", "portrait", "text-centric", "average")
PAPER_EDIT_CATEGORIES = ("scene", "enhance", "object", "text", "identity", "style", "average")
PAPER = {
    "Table 1": {  # T2I-Bench, 4-NFE students by training data; rank column: E2 1, E4 2, E1 3, E5 4, E3 5
        "E1": ((3.53, 3.37, 3.01, 3.30), (4.30, 4.31, 3.77, 4.13)),
        "E2": ((3.56, 3.57, 3.12, 3.42), (4.35, 4.34, 3.76, 4.15)),
        "E3": ((2.55, 3.38, 1.97, 2.63), (3.34, 3.88, 2.64, 3.29)),
        "E4": ((3.61, 3.54, 3.04, 3.40), (4.24, 4.33, 3.62, 4.06)),
        "E5": ((3.53, 3.47, 2.05, 3.02), (4.08, 4.23, 2.54, 3.62)),
    },
    "Table 2": {  # T2I-Bench
        "Qwen-Image-2.0-Base (80 NFE)": ((3.52, 3.64, 3.08, 3.41), (4.24, 4.30, 3.73, 4.09)),
        "Qwen-Image-2.0-Task-Specialized (80 NFE)": ((3.98, 3.82, 3.41, 3.74), (4.34, 4.47, 3.88, 4.26)),
        "Qwen-Image-Flash-T2I (4 NFE)": ((3.88, 3.81, 3.00, 3.56), (4.30, 4.41, 3.75, 4.15)),
    },
    "Table 3": {  # Editing-Bench
        "Teacher": ((2.52, 2.75, 2.33, 3.25, 3.16, 2.62, 2.77), (3.61, 3.22, 3.05, 3.69, 3.53, 3.56, 3.44)),
        "Zero-shot (T2I only)": (
            (2.78, 2.81, 2.25, 2.84, 3.16, 2.78, 2.77),
            (3.57, 3.03, 3.01, 3.11, 3.41, 3.52, 3.28),
        ),
        "9:1": ((2.43, 2.25, 2.09, 2.83, 3.12, 2.75, 2.58), (3.48, 3.21, 2.87, 3.25, 3.53, 3.50, 3.31)),
        "7:3": ((2.49, 2.80, 2.34, 3.35, 3.18, 3.05, 2.87), (3.46, 2.87, 3.08, 3.58, 3.52, 3.63, 3.36)),
        "5:5": ((2.86, 2.25, 2.68, 3.18, 3.19, 3.68, 2.97), (3.66, 3.06, 3.20, 3.13, 3.47, 3.92, 3.41)),
    },
    "Table 4": {  # T2I-Bench
        "Task-Specialized teacher": ((3.98, 3.82, 3.41, 3.74), (4.34, 4.47, 3.88, 4.26)),
        "Zero-shot (T2I only)": ((3.88, 3.81, 3.00, 3.56), (4.30, 4.41, 3.75, 4.15)),
        "9:1": ((4.04, 3.58, 3.17, 3.60), (4.39, 4.37, 3.77, 4.18)),
        "7:3": ((3.81, 3.77, 3.21, 3.60), (4.35, 4.40, 3.84, 4.20)),
        "5:5": ((3.95, 3.85, 3.14, 3.65), (4.34, 4.37, 3.76, 4.16)),
    },
}
