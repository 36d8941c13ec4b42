package standin

import (
	"archive/tar"
	"bufio"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// tarWriter writes an image root filesystem; the first error sticks and stops further writes.
type tarWriter struct {
	tw   *tar.Writer
	err  error
	dirs map[string]bool
}

func writeTar(path string, fill func(*tarWriter) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	tw := &tarWriter{tw: tar.NewWriter(bw), dirs: map[string]bool{}}
	err = fill(tw)
	if err == nil {
		err = tw.tw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (w *tarWriter) header(h *tar.Header) {
	if w.err != nil {
		return
	}
	h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
	h.ModTime = time.Unix(0, 0)
	h.Format = tar.FormatPAX
	w.err = w.tw.WriteHeader(h)
}

func (w *tarWriter) dir(name string, mode int64) {
	if w.dirs[name] {
		return
	}
	w.dirs[name] = true
	w.header(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode})
}

// parents writes the directories leading to name that are not written yet.
func (w *tarWriter) parents(name string) {
	var chain []string
	for d := filepath.Dir(name); d != "."; d = filepath.Dir(d) {
		chain = append(chain, d)
	}
	for _, d := range slices.Backward(chain) {
		w.dir(d, 0o755)
	}
}

func (w *tarWriter) symlink(name, target string) {
	w.header(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777})
}

func (w *tarWriter) file(name string, data []byte, mode int64) {
	w.header(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(data)), Mode: mode})
	if w.err == nil {
		_, w.err = w.tw.Write(data)
	}
}

// copyFile writes the content of src (symlinks followed) as name.
func (w *tarWriter) copyFile(name, src string, mode int64) {
	if w.err != nil {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		w.err = err
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		w.err = err
		return
	}
	w.header(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: fi.Size(), Mode: mode})
	if w.err == nil {
		_, w.err = io.Copy(w.tw, f)
	}
}

// copyTree writes the tree at src under name, keeping modes and symlinks; skip (given the path
// relative to src) leaves out a file or a whole directory.
func (w *tarWriter) copyTree(name, src string, skip func(rel string, d fs.DirEntry) bool) {
	if w.err != nil {
		return
	}
	w.parents(name + "/x")
	w.err = filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel != "." && skip != nil && skip(filepath.ToSlash(rel), d) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.ToSlash(filepath.Join(name, rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			w.dir(target, int64(info.Mode().Perm()))
		case info.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			w.symlink(target, link)
		case info.Mode().IsRegular():
			w.copyFile(target, p, int64(info.Mode().Perm()))
		}
		return w.err
	})
}
