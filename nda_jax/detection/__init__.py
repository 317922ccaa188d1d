"""Object detection transfer: VOC annotations and the VOC / COCO AP definitions."""
