//! The official 50-frame preprocessing: centring, OpenCV linear resize, y-rotation.
