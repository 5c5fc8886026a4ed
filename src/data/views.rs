//! Views: joint, motion, bone, bone-motion (generic over the layout).
