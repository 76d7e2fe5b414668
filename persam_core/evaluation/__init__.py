"""Scores: IoU (metrics), PerSeg mIoU / bIoU and DAVIS J / F (scores), few-shot episodes of
FSS-1000 and COCO-20i (fewshot)."""
