// startMark, in R8, tells the idle program (image_amd64.s) that the fast start (start_amd64.s)
// jumped to it with the descriptors in registers: "EDS_FAST".
#define startMark 0x545341465f534445
